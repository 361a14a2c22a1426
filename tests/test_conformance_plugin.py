"""The suite as an installed pytest plugin, seen from a third party's project."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_TEST = """
import pytest
import alkpubsub
from alkpubsub.conformance import TransportSuite, unique


class TestMine(TransportSuite):
    @pytest.fixture
    def factory(self):
        url = f"memory://{unique('bus')}"
        return lambda: alkpubsub.connect(url)

    async def test_a_skip_that_names_no_capability(self):
        pytest.skip("broker not reachable")
"""
SELECT = "publish_subscribe_keeps or resumes_after_last_ack or garbage or names_no_capability"


def run_project(tmp_path: Path, *, ci: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_mine.py").write_text(PROJECT_TEST)
    # strict mode: no marker on any test, no conftest: the plugin and the
    # suite's own markers must be enough.
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", SELECT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_suite_runs_in_strict_mode_and_names_the_missing_capability(tmp_path: Path) -> None:
    done = run_project(tmp_path, ci=False)
    assert "1 passed, 3 skipped" in done.stdout, done.stdout + done.stderr
    assert "capability not declared: consumer_offsets" in done.stdout
    assert "not applicable: no wire" in done.stdout


@pytest.mark.parametrize("ci", [False, True])
def test_a_skip_that_is_not_a_missing_capability_fails_under_ci(tmp_path: Path, ci: bool) -> None:
    done = run_project(tmp_path, ci=ci)
    if ci:
        assert done.returncode == 1
        assert "1 failed, 1 passed, 2 skipped" in done.stdout, done.stdout
        assert "not a missing capability: broker not reachable" in done.stdout
    else:
        assert done.returncode == 0, done.stdout
