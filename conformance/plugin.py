"""The suite's pytest plugin, loaded through the ``pytest11`` entry point.

Installing alkpubsub makes pytest load it; a third party needs only a test
class with a ``factory`` fixture (the cases carry their own pytest-asyncio
markers, so ``asyncio_mode`` may be "strict" or "auto"). The plugin makes a
case of the suite that is skipped for any reason other than a capability the
transport does not declare (or nothing to test, such as no wire) fail when
``CI`` is true, so a skip can never hide a failure in CI.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

from .suite import NOT_APPLICABLE, NOT_DECLARED, SuiteFixtures

ALLOWED_SKIPS = (NOT_DECLARED, NOT_APPLICABLE)


def _in_suite(item: pytest.Item) -> bool:
    cls = getattr(item, "cls", None)  # pytest's own attribute on Function items
    return isinstance(cls, type) and issubclass(cls, SuiteFixtures)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI, turn a suite case's skip that names no capability into a failure."""
    report = yield
    if report.skipped and _in_suite(item) and _in_ci() and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        if not reason.startswith(ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = (
                f"conformance case skipped under CI=true for a reason that is not a "
                f"missing capability: {reason}"
            )
    return report
