"""Run SQLAlchemy's dialect compliance suite against the Honker dialect, and
check that every test excluded as "fails the same way on pysqlite" does fail
with SQLAlchemy's own pysqlite driver in the same run. Exit 1 on any failure.

    .venv/bin/python compliance/sqlalchemy/run.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from exclusions import HONKER, SAME_ON_PYSQLITE, key_of  # noqa: E402


def run_suite(url: str, driver: str, folder: Path) -> tuple[int, dict[str, str]]:
    """Run the suite on ``url``; return pytest's exit code and each test's outcome."""
    report = folder / f"{url.split(':', 1)[0]}.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-c",
        str(HERE / "setup.cfg"),
        "--rootdir",
        str(HERE),
        f"--dburi={url}",
        f"--junitxml={report}",
        str(HERE / "test_suite.py"),
    ]
    env = dict(os.environ, ALKPUBSUB_SUITE_DRIVER=driver)
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if not report.exists():
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n")
        raise SystemExit(f"the {driver} suite run wrote no report (exit {done.returncode})")
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).iter("testcase"):
        name = f"file::{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[key_of(name)] = "failed"
        elif case.find("skipped") is not None:
            outcomes[key_of(name)] = "skipped"
        else:
            outcomes[key_of(name)] = "passed"
    if driver == "honker" and done.returncode != 0:
        print(done.stdout[-20000:])
    return done.returncode, outcomes


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="alkpubsub-suite-") as name:
        folder = Path(name)
        failed = False
        for driver in ("honker", "honker_async"):
            code, honker = run_suite(f"sqlite+{driver}:///{driver}.db", "honker", folder)
            failed = failed or code != 0 or "failed" in honker.values()
            summarize(driver, honker)
        _, pysqlite = run_suite("sqlite+pysqlite:///stock.db", "none", folder)
    wrong = sorted(k for k in SAME_ON_PYSQLITE if pysqlite.get(k) != "failed")
    if wrong:
        print("excluded as failing on pysqlite, but pysqlite did not fail them:")
        for key in wrong:
            print(f"  {key}: {pysqlite.get(key, 'not collected')}")
        return 1
    missing = sorted(k for k in SAME_ON_PYSQLITE if k not in honker)
    if missing:
        print("excluded tests the suite no longer has (remove them from same_on_pysqlite.txt):")
        print("\n".join(f"  {key}" for key in missing))
        return 1
    return 1 if failed else 0


def summarize(driver: str, outcomes: dict[str, str]) -> None:
    import sqlalchemy

    counts = {
        k: sum(1 for v in outcomes.values() if v == k) for k in ("passed", "failed", "skipped")
    }
    excluded = [k for k in outcomes if k in SAME_ON_PYSQLITE or k.split("[", 1)[0] in HONKER]
    print(
        f"SQLAlchemy {sqlalchemy.__version__} compliance suite on sqlite+{driver}: "
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
        f"({len(excluded)} of them excluded by name: {len(SAME_ON_PYSQLITE)} that fail the same "
        f"way on pysqlite, {len(excluded) - len(SAME_ON_PYSQLITE)} the Honker driver cannot do; "
        "the rest by requirements.py)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
