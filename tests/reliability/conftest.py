"""Reliability tests: crash, restart, leak and soak scenarios against real brokers.

Every scenario records one ``RELIABILITY ...`` line with its figures through the
``figures`` fixture; they are printed again together at the end of the pytest
run (a terminal-summary section), so they show in ``make test`` output even
with ``-q`` and output capture.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

_FIGURES = pytest.StashKey[list[str]]()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record one ``RELIABILITY`` line (printed now and in the run's summary)."""
    lines = request.config.stash.setdefault(_FIGURES, [])

    def record(line: str) -> None:
        lines.append(line)
        print(line)

    return record


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Print every recorded figure in a section of its own."""
    lines = config.stash.get(_FIGURES, [])
    if lines:
        terminalreporter.section("reliability figures")
        for line in lines:
            terminalreporter.write_line(line)
