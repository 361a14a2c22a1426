"""Opening Honker databases: one per path per process, shared by reference.

``open_store(path)`` returns a :class:`Store` handle. Every handle on the same
resolved path shares one :class:`SharedDatabase`: one honker ``Database`` (one
writer connection, one reader pool), one group-commit writer thread and one
wake-up watcher per event loop. Closing the last handle closes the database.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, TypeVar

import honker

from alkpubsub.errors import Closed, ConfigError, ConnectionLost, PubSubError
from alkpubsub.event import new_origin

from .gate import WriteGate
from .retention import PruneCounts, prune
from .transaction import (
    DEFAULT_STREAM,
    AsyncStoreTransaction,
    StoreTransaction,
    check_stream_name,
)
from .watcher import Watcher
from .writer import CALL, NOTIFY, SESSION, STREAM, GroupCommitWriter, Job, Session, WriterStats
from .writer import settle_futures as settle

T = TypeVar("T")

DEFAULT_BUSY_TIMEOUT = 5.0

# The database whose write transaction the current task or thread holds open:
# a publish through the writer from inside it would wait for itself forever.
_holding: contextvars.ContextVar[SharedDatabase | None] = contextvars.ContextVar(
    "alkpubsub_holding_store", default=None
)


class SharedDatabase:
    """What all handles on one file share. Internal; use :class:`Store`."""

    def __init__(self, path: str, busy_timeout: float) -> None:
        self.path = path
        self.gate = WriteGate(path, busy_timeout)
        # honker.open writes (schema bootstrap); wait for other writers here, where
        # the wait releases the GIL, not in SQLite's busy handler, which keeps it.
        try:
            self.gate.acquire()
        except PubSubError as exc:
            self.gate.close()
            raise ConnectionLost(f"cannot open Honker database {path!r}: {exc}") from None
        try:
            self.db: honker.Database = honker.open(path)
        except Exception as exc:
            self.gate.release()
            self.gate.close()
            raise ConfigError(f"cannot open Honker database {path!r}: {exc}") from None
        self.gate.release()
        self.writer = GroupCommitWriter(self)
        self.refs = 0
        self._watchers: dict[asyncio.AbstractEventLoop, Watcher] = {}
        self._watchers_lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[Job]] = {}

    def submit(self, job: Job) -> None:
        """Queue ``job`` from its loop's thread. Everything queued before the loop
        next runs its callbacks is committed together (one group commit)."""
        loop = job.loop
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._flush, loop)
        pending.append(job)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs = self._pending.pop(loop, None)
        if not jobs:
            return
        try:
            self.writer.dispatch(jobs)
        except BaseException:
            # The watcher may be skipping a read for this commit: wake it anyway.
            watcher = self._watchers.get(loop)
            if watcher is not None:
                watcher.wake()
            raise

    def commit_queued(self, loop: asyncio.AbstractEventLoop) -> bool:
        """True when ``loop`` has writes queued for its next turn's group commit,
        which will wake its watcher when it ends (committed or not)."""
        return loop in self._pending

    def watcher(self, loop: asyncio.AbstractEventLoop) -> Watcher:
        with self._watchers_lock:
            found = self._watchers.get(loop)
            if found is None:
                found = self._watchers[loop] = Watcher(self, loop)
                found.start()
            return found

    def release_watcher(self, watcher: Watcher) -> None:
        """Stop ``watcher`` once nothing is subscribed through it."""
        with self._watchers_lock:
            if watcher.idle and self._watchers.get(watcher.loop) is watcher:
                del self._watchers[watcher.loop]
                watcher.stop()

    def after_commit(
        self,
        settled: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]],
        committed: bool,
    ) -> None:
        """Settle waiters and wake this process's watchers: one callback per loop.

        Watchers are woken even when nothing committed: one may have skipped a
        read because this commit was queued (see ``Watcher._run``)."""
        watchers = dict(self._watchers)
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for loop in settled.keys() | watchers.keys():
            watcher = watchers.get(loop)
            wake = watcher.wake if watcher else None
            if loop is here:
                settle(settled.get(loop, []), wake)
                continue
            with suppress(RuntimeError):  # that loop is closed; nobody waits there any more
                loop.call_soon_threadsafe(settle, settled.get(loop, []), wake)

    def wake_watchers(self, here: asyncio.AbstractEventLoop) -> None:
        """After a commit made on the loop ``here``: wake every watcher of this file."""
        for loop, watcher in list(self._watchers.items()):
            if loop is here:
                watcher.wake()
            else:
                with suppress(RuntimeError):
                    loop.call_soon_threadsafe(watcher.wake)

    def shutdown(self) -> None:
        self.writer.stop()
        with self._watchers_lock:
            watchers, self._watchers = list(self._watchers.values()), {}
        for watcher in watchers:
            with suppress(RuntimeError):
                watcher.loop.call_soon_threadsafe(watcher.stop)
        self.db.close()
        self.gate.close()


_registry: dict[str, SharedDatabase] = {}
_registry_lock = threading.Lock()


def resolve_path(path: str | os.PathLike[str]) -> str:
    """The absolute, symlink-free path one database is known by in this process."""
    text = os.fspath(path)
    if not isinstance(text, str) or not text or text == ":memory:" or text.startswith("file:"):
        raise ConfigError(
            f"Honker needs a database file, not {text!r}: its reader connections cannot see "
            "an in-memory database; give a path such as './events.db'"
        )
    resolved = os.path.realpath(os.path.abspath(text))
    parent = os.path.dirname(resolved)
    if not os.path.isdir(parent):
        raise ConfigError(
            f"directory {parent!r} of the Honker database {text!r} does not exist; create it first"
        )
    return resolved


def open_store(
    path: str | os.PathLike[str],
    *,
    origin: str | None = None,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
) -> Store:
    """Open (or share) the Honker database at ``path``.

    ``busy_timeout`` is how long a write waits for another writer of the file
    (seconds); the first opener of a path in a process sets it. ``origin`` is
    stamped on events this handle's transactions publish.
    """
    resolved = resolve_path(path)
    with _registry_lock:
        shared = _registry.get(resolved)
        if shared is None:
            shared = _registry[resolved] = SharedDatabase(resolved, busy_timeout)
        shared.refs += 1
    return Store(shared, origin=origin)


def _release(shared: SharedDatabase) -> None:
    with _registry_lock:
        shared.refs -= 1
        if shared.refs > 0:
            return
        if _registry.get(shared.path) is shared:
            del _registry[shared.path]
    shared.shutdown()


@atexit.register
def _flush_writers() -> None:
    # Commit what publishers queued before the interpreter goes away.
    with _registry_lock:
        shared = list(_registry.values())
    for each in shared:
        each.writer.stop(timeout=5.0)


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
        """The underlying honker ``Database``."""
        self._check_open()
        return self._shared.db

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
        try:
            yield AsyncStoreTransaction(session)
        except BaseException:
            ended = session.end(commit=False)
            await asyncio.shield(ended)
            raise
        else:
            await session.end(commit=True)
        finally:
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
        if _holding.get() is self._shared:
            raise PubSubError(
                f"a write transaction on {self.path!r} is open here, and this write would wait "
                "for it forever; publish through the open transaction's tx.publish/tx.notify"
            )

    # -- reading -------------------------------------------------------------

    def watcher(self) -> Watcher:
        """The wake-up watcher of this database for the running event loop."""
        self._check_open()
        return self._shared.watcher(asyncio.get_running_loop())

    def consumer_offsets(self, stream: str = DEFAULT_STREAM) -> dict[str, int]:
        """Saved position of every durable consumer of ``stream``."""
        check_stream_name(stream)
        rows = self.honker.query(
            "SELECT name, offset FROM _honker_stream_consumers WHERE topic = ? ORDER BY name",
            [stream],
        )
        return {row["name"]: int(row["offset"]) for row in rows}

    def stream_head(self, stream: str = DEFAULT_STREAM) -> int:
        """The offset of the newest event in ``stream`` (0 if empty); a consumer's
        lag is ``stream_head() - consumer_offsets()[name]`` rows (other topics included)."""
        rows = self.honker.query(
            "SELECT COALESCE(MAX(offset), 0) AS m FROM _honker_stream WHERE topic = ?",
            [check_stream_name(stream)],
        )
        return int(rows[0]["m"])

    def remove_consumer(self, name: str, stream: str = DEFAULT_STREAM) -> bool:
        """Forget a durable consumer's position (it no longer holds back pruning)."""
        with self.transaction() as tx:
            tx.execute(
                "DELETE FROM _honker_stream_consumers WHERE name = ? AND topic = ?",
                [name, check_stream_name(stream)],
            )
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
            _release(self._shared)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"the store for {self.path!r} is closed; open_store() it again")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Store {self.path!r} {state}>"


__all__ = ["DEFAULT_BUSY_TIMEOUT", "SharedDatabase", "Store", "open_store", "resolve_path"]
