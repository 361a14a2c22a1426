"""Child processes of the reliability tests: start, SIGKILL, stop, always bounded.

Each child is ``sys.executable`` running one of the scripts in this folder,
with its output in a log file (never a pipe nobody drains) and its facts in a
record file (``crash_records``). Children ask the kernel to kill them if the
test process dies (``die_with_parent``); :class:`Children` kills whatever is
still running when its ``with`` block ends, so a failing test leaves none.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from crash_records import RecordReader

HERE = Path(__file__).resolve().parent
WAIT = 15.0
"""Seconds any wait on a child may take (start-up, exit) before the test fails."""


class Child:
    """One child process with its record file and log."""

    def __init__(self, name: str, script: str, args: list[str], workdir: Path) -> None:
        self.name = name
        self.records = workdir / f"{name}.rec"
        self.log = workdir / f"{name}.log"
        self.reader = RecordReader(self.records)
        env = {**os.environ, "RELIABILITY_PARENT": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / script), str(self.records), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=HERE,
            )
        self.started = time.monotonic()
        self.killed_at: float | None = None

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit code; ``-9`` after SIGKILL; None while running."""
        return self.proc.poll()

    def kill(self) -> float:
        """SIGKILL the child, wait for it, and return the time of the kill."""
        if self.running:
            self.killed_at = time.monotonic()
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WAIT)
        return self.killed_at or time.monotonic()

    def stop(self) -> int:
        """SIGTERM the child (a graceful close) and return its exit code."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {WAIT} s of SIGTERM") from None

    def log_tail(self, lines: int = 25) -> str:
        """The end of the child's output, for failure messages."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no output)"
        return "\n".join(text.rstrip().splitlines()[-lines:]) or "(no output)"


class Children:
    """Every child a scenario started; kills the ones still running on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.all: list[Child] = []

    def start(self, name: str, script: str, *args: str) -> Child:
        """Start ``script`` with its record file, then ``args``, as arguments."""
        child = Child(name, script, list(args), self.workdir)
        self.all.append(child)
        return child

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for child in self.all:
            if child.running:
                child.kill()
