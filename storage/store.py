"""Opening Honker databases: one per path per process, shared by reference.

``open_store(path)`` returns a :class:`Store` handle. Every handle on the same
resolved path shares one :class:`~alkpubsub.storage.shared.SharedDatabase`: one
honker ``Database`` (one writer connection, one reader pool), one group-commit
writer thread and one wake-up watcher per event loop. Closing the last handle
closes the database.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar, cast

import honker

from alkpubsub.capabilities import Start
from alkpubsub.errors import Closed, ConfigError, ConnectionLost, PubSubError
from alkpubsub.event import new_origin

from .consumers import (
    REMOVE,
    ROWS_AFTER,
    STREAM_HEAD,
    ConsumerLease,
    StreamConsumer,
    list_consumers,
    row_name,
    start_position,
)
from .honker_guard import Guarded
from .jobs import CALL, NOTIFY, SESSION, STREAM, Job, Session, WriterStats
from .pruning import DEFAULT_NOTIFY_RETENTION
from .retention import PruneCounts, prune
from .shared import SharedDatabase, acquire, release, resolve_path
from .transaction import (
    DEFAULT_STREAM,
    AsyncStoreTransaction,
    StoreTransaction,
    check_stream_name,
)
from .watcher import Watcher

T = TypeVar("T")

DEFAULT_BUSY_TIMEOUT = 5.0

# The database whose write transaction the current task or thread holds open:
# a publish through the writer from inside it would wait for itself forever.
_holding: contextvars.ContextVar[SharedDatabase | None] = contextvars.ContextVar(
    "alkpubsub_holding_store", default=None
)


def open_store(
    path: str | os.PathLike[str],
    *,
    origin: str | None = None,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    notify_retention: float = DEFAULT_NOTIFY_RETENTION,
) -> Store:
    """Open (or share) the Honker database at ``path``.

    ``busy_timeout`` is how long a write waits for another writer of the file
    (seconds); ``notify_retention`` is how long notifications are kept before
    this process's writer prunes them (seconds, 0 = never; see
    :mod:`alkpubsub.storage.pruning`). The first opener of a path in a process
    sets both. ``origin`` is stamped on events this handle's transactions publish.

    A new file is created with mode 0600 (as are its ``-wal``, ``-shm`` and
    ``-alkpubsub.lock``); an existing file keeps its mode. A path that is a
    directory, a file that is not a SQLite database, or a directory this user
    cannot write raises :class:`ConfigError` and leaves no lock file behind.
    """
    if isinstance(notify_retention, bool) or not notify_retention >= 0:
        raise ConfigError(f"notify_retention={notify_retention!r} must be seconds >= 0")
    shared = acquire(resolve_path(path), busy_timeout, float(notify_retention))
    return Store(shared, origin=origin)


class Store:
    """A handle on one Honker database (see :func:`open_store`).

    ``store.honker`` is honker's ``Database`` for its queues, locks and
    scheduler. Inside this process, reach the file only through honker: a
    second SQLite library (Python's ``sqlite3``) on the same file in the same
    process breaks both libraries' locks.
    """

    def __init__(self, shared: SharedDatabase, *, origin: str | None = None) -> None:
        self._shared = shared
        self.origin = origin or new_origin()
        self._closed = False

    # -- facts ---------------------------------------------------------------

    @property
    def path(self) -> str:
        """The resolved path of the database file."""
        return self._shared.path

    @property
    def honker(self) -> honker.Database:
        """The underlying honker ``Database``, for reads (``query``) and for
        honker's own API outside transactions. Its writes wait for SQLite's
        lock themselves (not through the store's write gate); inside a store
        transaction use ``tx.enqueue``/``tx.acquire_lock``/... instead. On the
        event loop's thread while an async transaction on this file is open, a
        honker write raises :class:`~alkpubsub.errors.TransactionOpen` (it would
        otherwise hang the process: see ``honker_guard``)."""
        self._check_open()
        shared = self._shared
        return cast(honker.Database, Guarded(shared.db, shared.sessions, shared.path, "honker"))

    @property
    def shared(self) -> SharedDatabase:
        """The per-process state behind every handle on this file (transports use it)."""
        return self._shared

    @property
    def writer_stats(self) -> WriterStats:
        """Live counters of this database's group-commit writer."""
        return self._shared.writer.stats

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called on this handle."""
        return self._closed

    # -- transactions ----------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[StoreTransaction]:
        """A write transaction on the calling thread (it blocks that thread while
        it waits for the writer). In async code prefer :meth:`atransaction`."""
        self._check_open()
        shared = self._shared
        shared.sessions.check(self.path, "store.transaction()")
        if threading.get_ident() in shared.sqla_writers:
            raise PubSubError(
                f"a SQLAlchemy write transaction on {self.path!r} was opened in this thread and "
                "is still open: store.transaction() would wait for it forever; publish through "
                "store_transaction(session), or after the session's commit"
            )
        shared.gate.acquire()
        token = _holding.set(shared)
        try:
            with shared.db.transaction() as htx:
                yield StoreTransaction(htx, self.origin)
        finally:
            _holding.reset(token)
            shared.gate.release()
        shared.after_commit({}, True)

    @asynccontextmanager
    async def atransaction(self) -> AsyncIterator[AsyncStoreTransaction]:
        """A write transaction whose SQL runs on the writer thread; ``await`` its
        methods. Queued publishes commit before it starts or after it ends."""
        self._check_open()
        self._check_not_holding()
        loop = asyncio.get_running_loop()
        session = Session(loop, self.origin)
        self._shared.writer.submit(Job(SESSION, session, loop, session.begun, self.origin))
        try:
            await session.begun
        except BaseException:
            session.end(commit=False)  # if it did begin after all, roll it back
            raise
        token = _holding.set(self._shared)
        sessions = self._shared.sessions
        sessions.opened(loop)
        try:
            yield AsyncStoreTransaction(session)
        except BaseException:
            ended = session.end(commit=False)
            await asyncio.shield(ended)
            raise
        else:
            await session.end(commit=True)
        finally:
            sessions.closed(loop)
            _holding.reset(token)

    async def write(self, fn: Callable[[StoreTransaction], T], *, short: bool = False) -> T:
        """Run ``fn(tx)`` inside the next group commit and return its result once
        committed. It runs on the writer thread; ``short=True`` (a few statements)
        also lets it commit on the event loop when the file is uncontended."""
        result: T = await self._submit(CALL, fn, inline=short)
        return result

    async def append(self, stream: str, rows: Sequence[tuple[str | None, str]]) -> list[int]:
        """Append ``(key, envelope)`` rows to ``stream`` in one commit; return their offsets."""
        offsets: list[int] = await self._submit(STREAM, (stream, rows))
        return offsets

    async def notify_many(self, rows: Sequence[tuple[str, str]]) -> None:
        """Insert ``(channel, envelope)`` notifications in one commit."""
        await self._submit(NOTIFY, rows)

    def _submit(self, kind: int, arg: Any, inline: bool = True) -> asyncio.Future[Any]:
        self._check_open()
        self._check_not_holding()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._shared.submit(Job(kind, arg, loop, future, self.origin, inline))
        return future

    def _check_not_holding(self) -> None:
        if _holding.get() is self._shared or threading.get_ident() in self._shared.sqla_writers:
            raise PubSubError(
                f"a write transaction on {self.path!r} is open here, and this write would wait "
                "for it forever; publish through the open transaction's tx.publish/tx.notify"
            )

    # -- reading -------------------------------------------------------------

    def watcher(self) -> Watcher:
        """The wake-up watcher of this database for the running event loop."""
        self._check_open()
        return self._shared.watcher(asyncio.get_running_loop())

    def rows_after(self, stream: str, offset: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` rows of ``stream`` after ``offset``, oldest first, through
        the reader pool: dicts of ``offset``, ``key``, ``payload`` and ``created_at``
        (any SQLite type: other clients write these rows too)."""
        rows: list[dict[str, Any]] = self.honker.query(ROWS_AFTER, [stream, offset, limit])
        return rows

    def start_position(self, stream: str, start: Start) -> int:
        """The offset a reader of ``stream`` without a saved position continues after."""
        return start_position(self.honker.query, stream, start)

    def consumers(self, stream: str = DEFAULT_STREAM) -> list[StreamConsumer]:
        """Every durable consumer of ``stream``: alkpubsub's and honker's own
        (``stream.subscribe(consumer=)``), each with its kind and saved offset."""
        return list_consumers(self.honker.query, check_stream_name(stream))

    def consumer_offsets(self, stream: str = DEFAULT_STREAM) -> dict[str, int]:
        """Saved position of every alkpubsub durable consumer of ``stream``, by name."""
        return {c.name: c.offset for c in self.consumers(stream) if c.kind == "alkpubsub"}

    def consumer_lease(self, stream: str, consumer: str, ttl: int) -> ConsumerLease:
        """The lease (claim and saved position) of alkpubsub's consumer ``consumer``."""
        return ConsumerLease(self.write, self.path, check_stream_name(stream), consumer, ttl)

    def stream_head(self, stream: str = DEFAULT_STREAM) -> int:
        """The offset of the newest event in ``stream`` (0 if empty); a consumer's
        lag is ``stream_head() - consumer_offsets()[name]`` rows (other topics included)."""
        rows = self.honker.query(STREAM_HEAD, [check_stream_name(stream)])
        return int(rows[0]["m"])

    def remove_consumer(
        self, name: str, stream: str = DEFAULT_STREAM, *, kind: str = "alkpubsub"
    ) -> bool:
        """Forget a durable consumer's position (it no longer holds back pruning):
        alkpubsub's consumer ``name``, or with ``kind="honker"`` honker's own."""
        if kind not in ("alkpubsub", "honker"):
            raise ConfigError(f"kind={kind!r}: use 'alkpubsub' or 'honker'")
        stored = row_name(name) if kind == "alkpubsub" else name
        with self.transaction() as tx:
            tx.execute(REMOVE, [stored, check_stream_name(stream)])
            return bool(tx.query("SELECT changes() AS n")[0]["n"])

    # -- retention -----------------------------------------------------------

    def prune(
        self,
        older_than: float | None = None,
        keep_last: int | None = None,
        force: bool = False,
    ) -> PruneCounts:
        """Delete notifications and stream rows older than ``older_than`` seconds
        or beyond the newest ``keep_last`` (per stream); see :func:`prune`."""
        with self.transaction() as tx:
            return prune(tx, older_than=older_than, keep_last=keep_last, force=force)

    async def aprune(
        self,
        older_than: float | None = None,
        keep_last: int | None = None,
        force: bool = False,
    ) -> PruneCounts:
        """:meth:`prune` on the writer thread."""
        return await self.write(
            lambda tx: prune(tx, older_than=older_than, keep_last=keep_last, force=force)
        )

    # -- closing -------------------------------------------------------------

    def close(self) -> None:
        """Release this handle; the last one closes the database. Idempotent."""
        if not self._closed:
            self._closed = True
            release(self._shared)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"the store for {self.path!r} is closed; open_store() it again")
        lost = self._shared.lost
        if lost is not None:
            raise ConnectionLost(str(lost))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Store {self.path!r} {state}>"


__all__ = ["DEFAULT_BUSY_TIMEOUT", "SharedDatabase", "Store", "open_store", "resolve_path"]
