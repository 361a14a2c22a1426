"""A one-line progress bar on stderr (no dependency).

On a terminal the line is redrawn in place; otherwise one line per finished
case is printed, so logs of long runs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts measurement runs of the whole benchmark."""

    def __init__(self, total: int, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.started = time.monotonic()

    def step(self, label: str) -> None:
        """One run finished; ``label`` says what runs next."""
        self.done += 1
        self.show(label)

    def show(self, label: str) -> None:
        """Redraw the bar with ``label``."""
        if not self.tty:
            return
        width = 24
        filled = int(width * min(self.done, self.total) / self.total)
        elapsed = time.monotonic() - self.started
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s {label}"
        self.stream.write("\r\x1b[2K" + line[:120])
        self.stream.flush()

    def case_done(self, line: str) -> None:
        """A case finished: print ``line`` on its own (non-terminal output)."""
        if self.enabled and not self.tty:
            self.stream.write(line + "\n")
            self.stream.flush()

    def finish(self) -> None:
        """Clear the bar."""
        if self.tty:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
