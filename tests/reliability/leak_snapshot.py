"""What a process holds: asyncio tasks, threads, open file descriptors.

:func:`take` records them; :func:`settle` waits (bounded) until nothing beyond a
baseline is left and returns what still is, named so a failure says exactly
what leaked: task names and coroutines, thread names, descriptor targets
(``socket:[inode]``, file paths, ``anon_inode:[eventfd]``...).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Snapshot:
    """Tasks, threads and descriptors alive at one moment."""

    tasks: set[asyncio.Task[object]]
    threads: set[threading.Thread]
    fds: Counter[str]

    def extra(self, baseline: Snapshot, own: set[asyncio.Task[object]]) -> Leaks:
        """What this snapshot holds beyond ``baseline``, ignoring ``own`` tasks."""
        tasks = self.tasks - baseline.tasks - own
        return Leaks(
            tasks=sorted(f"{t.get_name()}: {t.get_coro()!r}" for t in tasks if not t.done()),
            threads=sorted(t.name for t in self.threads - baseline.threads if t.is_alive()),
            fds=sorted((self.fds - baseline.fds).elements()),
        )


@dataclass
class Leaks:
    """Named leftovers; empty lists mean nothing leaked."""

    tasks: list[str] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)
    fds: list[str] = field(default_factory=list)
    settled_in: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.tasks or self.threads or self.fds)

    def describe(self) -> str:
        """Everything left over, one kind per line."""
        return (
            f"tasks left: {self.tasks or 'none'}\nthreads left: {self.threads or 'none'}\n"
            f"descriptors left: {self.fds or 'none'}"
        )


def _fds() -> Counter[str]:
    targets: Counter[str] = Counter()
    for name in os.listdir("/proc/self/fd"):
        # OSError: the listing's own descriptor, closed by the time we look.
        with contextlib.suppress(OSError):
            targets[os.readlink(f"/proc/self/fd/{name}")] += 1
    return targets


def take() -> Snapshot:
    """The tasks of the running loop, live threads and open descriptors now."""
    return Snapshot(set(asyncio.all_tasks()), set(threading.enumerate()), _fds())


async def settle(baseline: Snapshot, own: set[asyncio.Task[object]], within: float) -> Leaks:
    """Wait up to ``within`` seconds for everything beyond ``baseline`` to go."""
    started = time.monotonic()
    while True:
        gc.collect()  # a transport's sockets may close only when collected
        current = asyncio.current_task()
        leaks = take().extra(baseline, own | ({current} if current else set()))
        leaks.settled_in = time.monotonic() - started
        if not leaks or leaks.settled_in > within:
            return leaks
        await asyncio.sleep(0.05)
