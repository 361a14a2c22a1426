"""The record files the reliability children write and the tests read.

A child appends one line per fact to its record file, each with a single
``os.write`` on an ``O_APPEND`` descriptor: the kernel has the whole line the
moment the call returns, so a SIGKILL can only cut off a line that was never
written, and readers skip an unfinished last line. Times are
``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process on the
host), so a child's times compare with the test's.

Lines (space separated; the first word is the kind):

``ready <t>``
    the child connected (and, for a consumer, its subscription is live).
``event <n> <id> <offset> <t> <whole>``
    a consumer processed event ``id`` (at ``offset`` in the durable log)
    carrying sequence number ``n``; ``whole`` is 1 when topic and payload are
    exactly what the publisher sent.
``stats <json>``
    a consumer's ``sub.stats`` (written every half second).
``begin <first> <count> <t>``
    a publisher is calling ``publish_many`` for ``n = first .. first+count-1``.
``accepted <first> <count> <t> <id,id,...>``
    that call returned these event ids (in order).
``failed <first> <count> <t> <error>``
    that call raised; the batch is retried with new events.
``done <t>``
    a publisher published everything it was asked to.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAD = "x" * 64
"""Every event's payload is ``{"n": n, "pad": PAD}``: a fixed shape a consumer can
check for wholeness."""


def payload(n: int) -> dict[str, Any]:
    """The payload of event ``n``."""
    return {"n": n, "pad": PAD}


def is_whole(value: Any) -> bool:
    """True for a payload exactly as :func:`payload` makes it."""
    return (
        isinstance(value, dict)
        and value.keys() == {"n", "pad"}
        and isinstance(value["n"], int)
        and value["pad"] == PAD
    )


class RecordWriter:
    """Appends whole lines to a record file (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, *words: object) -> None:
        """Append one line made of ``words``."""
        os.write(self._fd, (" ".join(str(w) for w in words) + "\n").encode())

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


@dataclass
class RecordReader:
    """Reads the complete lines a child appended since the last call."""

    path: Path
    _offset: int = 0
    _partial: bytes = field(default=b"", repr=False)

    def new_lines(self) -> Iterator[list[str]]:
        """Each new complete line, split into words."""
        try:
            with open(self.path, "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            if line:
                yield line.decode().split(" ")


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, so a crashed
    test run leaves no children; exit at once if the parent is already gone."""
    parent = int(os.environ.get("RELIABILITY_PARENT", "0"))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if parent and os.getppid() != parent:
        os._exit(3)
