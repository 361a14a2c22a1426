"""``store.honker``: honker's ``Database``, guarded against the one call that
would hang the process.

While ``async with store.atransaction()`` is open, honker's single writer
connection belongs to that transaction and its SQL runs on the writer thread,
which waits for the event loop's next statement. A honker write made on that
loop's thread (``db.queue(name).enqueue(...)`` without ``tx=``, ``db.lock``,
``db.transaction()``, creating a queue) would wait for the writer connection
with the loop blocked: neither ever moves again. Through this proxy such a call
raises :class:`~alkpubsub.errors.TransactionOpen` at once instead. Reads
(``query``, through honker's reader pool) always go through, and the objects
``queue()``, ``stream()`` and ``lock()`` return are guarded the same way.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from alkpubsub.errors import TransactionOpen

UNGUARDED = frozenset({"query", "update_events", "name", "max_attempts"})
"""Attributes that never wait for the writer connection (or are plain values)."""
WRAPPED_RESULTS = frozenset({"queue", "stream", "lock", "outbox", "transaction"})
"""Methods whose results hold the database and are guarded in turn."""


class SessionCount:
    """Async store transactions open per event loop on one file."""

    def __init__(self) -> None:
        self._open: dict[asyncio.AbstractEventLoop, int] = {}

    def opened(self, loop: asyncio.AbstractEventLoop) -> None:
        self._open[loop] = self._open.get(loop, 0) + 1

    def closed(self, loop: asyncio.AbstractEventLoop) -> None:
        left = self._open.get(loop, 0) - 1
        if left > 0:
            self._open[loop] = left
        else:
            self._open.pop(loop, None)

    def check(self, path: str, what: str) -> None:
        """Raise :class:`TransactionOpen` if ``what`` would wait for a transaction
        open on the event loop running in this thread."""
        if not self._open:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on a loop's thread: it waits for the transaction to end
        if loop in self._open:
            raise TransactionOpen(
                f"{what} on {path!r} would wait forever: an async store transaction on this "
                "file is open on this event loop. Inside the block use the transaction's tx "
                "(tx.enqueue, tx.acquire_lock, tx.renew_lock, tx.release_lock, tx.schedule, "
                "tx.publish, tx.execute); otherwise call it after the block ends"
            )


class Guarded:
    """Forwards to a honker object, checking writes against open transactions."""

    __slots__ = ("_label", "_path", "_sessions", "_target")

    def __init__(self, target: Any, sessions: SessionCount, path: str, label: str) -> None:
        self._target = target
        self._sessions = sessions
        self._path = path
        self._label = label

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name == "db":  # a queue's or stream's database: guarded like the store's
            return Guarded(value, self._sessions, self._path, "honker")
        if name in UNGUARDED or name.startswith("_") or not callable(value):
            return value
        return self._guard(name, value)

    def _guard(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        sessions, path, label = self._sessions, self._path, f"{self._label}.{name}()"

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("tx") is None:  # given a tx, it runs in that transaction
                sessions.check(path, label)
            result = method(*args, **kwargs)
            if name in WRAPPED_RESULTS:
                return Guarded(result, sessions, path, f"{label}")
            return result

        return call

    def __enter__(self) -> Any:
        self._sessions.check(self._path, f"with {self._label}")
        return self._target.__enter__()

    def __exit__(self, *exc: object) -> Any:
        return self._target.__exit__(*exc)

    def __repr__(self) -> str:
        return f"<guarded {self._target!r}>"
