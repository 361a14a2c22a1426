"""What the group-commit writer works on: jobs, sessions, results and counters."""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .transaction import StoreTransaction


@dataclass(slots=True)
class WriterStats:
    """Counters of one database's group-commit writer (for benchmarks and ``stats``)."""

    commits: int = 0
    """Transactions committed (group commits, inline ones included, and sessions)."""
    jobs: int = 0
    """Write requests committed (one ``publish``, one ``publish_many``, one ack save...)."""
    rows: int = 0
    """Stream rows and notifications written."""
    largest_batch: int = 0
    """Most jobs committed in one transaction."""
    failed_jobs: int = 0
    """Jobs that raised (their callers got the error)."""
    inline_commits: int = 0
    """Commits made on the event loop (uncontended, small); the rest ran on the thread."""
    pruned_notifications: int = 0
    """Notifications deleted by automatic pruning."""
    prune_failures: int = 0
    """Pruning passes that failed (retried one interval later; the first is logged)."""

    @property
    def mean_batch(self) -> float:
        """Jobs per commit."""
        return self.jobs / self.commits if self.commits else 0.0

    def as_dict(self) -> dict[str, float]:
        """A plain dict, including ``mean_batch``."""
        return {**asdict(self), "mean_batch": self.mean_batch}


# Job kinds
STREAM = 1  # arg: (stream, [(key, envelope_text), ...]) -> list of offsets
NOTIFY = 2  # arg: [(channel, envelope_text), ...] -> None
CALL = 3  # arg: fn(StoreTransaction) -> result
SESSION = 4  # arg: Session


class Job:
    """One write request. ``inline`` marks short internal work that may commit on
    the event loop (never a user's function of unknown length)."""

    __slots__ = ("arg", "future", "inline", "kind", "loop", "origin")

    def __init__(
        self,
        kind: int,
        arg: Any,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        origin: str,
        inline: bool = True,
    ) -> None:
        self.kind = kind
        self.arg = arg
        self.loop = loop
        self.future = future
        self.origin = origin
        self.inline = inline

    @property
    def rows(self) -> int:
        if self.kind == STREAM:
            return len(self.arg[1])
        if self.kind == NOTIFY:
            return len(self.arg)
        return 1


class Failed:
    """A job's error, in place of its result."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


END = object()
"""Sent to a :class:`Session` to end it."""


class Session:
    """An ``atransaction()`` running on the writer thread: it holds the write
    transaction open and runs the operations the coroutine sends it, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: str) -> None:
        self.loop = loop
        self.origin = origin
        self.begun: asyncio.Future[None] = loop.create_future()
        self.ops: queue.SimpleQueue[tuple[object, Any, asyncio.Future[Any]]] = queue.SimpleQueue()

    def run(self, fn: Callable[[StoreTransaction], Any]) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self.ops.put((fn, None, future))
        return future

    def end(self, commit: bool) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self.ops.put((END, commit, future))
        return future


def settle_futures(
    items: list[tuple[asyncio.Future[Any], Any]], wake: Callable[[], None] | None
) -> None:
    """On the futures' loop: set each result (or failure), then wake that loop's watcher."""
    for future, result in items:
        if future.done():
            continue
        if isinstance(result, Failed):
            future.set_exception(result.error)
        else:
            future.set_result(result)
    if wake is not None:
        wake()


def send(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any) -> None:
    """Settle ``future`` on its loop from another thread."""
    with contextlib.suppress(RuntimeError):  # the loop was closed; nobody is waiting
        loop.call_soon_threadsafe(settle_futures, [(future, result)], None)
