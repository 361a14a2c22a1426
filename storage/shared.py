"""One :class:`SharedDatabase` per database file per process, shared by reference.

It holds the honker ``Database`` (one writer connection, one reader pool), the
write gate, the group-commit writer thread, the notification pruner and one
wake-up watcher per event loop. :func:`acquire` and :func:`release` count the
:class:`~alkpubsub.storage.Store` handles on it; the last release closes it.

A database whose file is replaced or deleted while open is *lost*: every
subscription on it fails with :class:`ConnectionLost`, and every later write,
read or subscribe raises it. Once every handle on it is closed, opening the
path again (a new transport or ``open_store``) opens the file now there; before
that, opening raises ``ConnectionLost`` too, because SQLite would let the new
file share the old one's ``-wal`` and ``-shm`` (which corrupts databases).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
from contextlib import suppress
from typing import Any

import honker

from alkpubsub.errors import ConfigError, ConnectionLost, PubSubError

from .files import FileIdentity, create_private_database
from .gate import WriteGate
from .honker_guard import SessionCount
from .jobs import Job
from .jobs import settle_futures as settle
from .pruning import NotificationPruner
from .watcher import Watcher
from .writer import GroupCommitWriter

log = logging.getLogger("alkpubsub.storage")

FILE_CHECK_INTERVAL = 1.0
"""Seconds between checks, on write, that the path still names the opened file."""


class SharedDatabase:
    """What all handles on one file share. Internal; use :class:`~alkpubsub.storage.Store`."""

    def __init__(self, path: str, busy_timeout: float, notify_retention: float) -> None:
        self.path = path
        self.lost: ConnectionLost | None = None
        """Set once the file was replaced or deleted underneath (see the module docstring)."""
        create_private_database(path)
        self.gate = WriteGate(path, busy_timeout)
        self.sessions = SessionCount()
        self.sqla_writers: dict[int, int] = {}
        """Threads that opened a SQLAlchemy write transaction still open (ident ->
        count): a publish through the writer from one of them would wait for it."""
        """Async transactions open per event loop (see honker_guard)."""
        # honker.open writes (schema bootstrap); wait for other writers here, where
        # the wait releases the GIL, not in SQLite's busy handler, which keeps it.
        try:
            self.gate.acquire()
        except PubSubError as exc:
            self.gate.close()
            raise ConnectionLost(f"cannot open Honker database {path!r}: {exc}") from None
        db: honker.Database | None = None
        try:
            db = honker.open(path)
            self.identity = FileIdentity.of(path)
            # Only now: a failed open must not leave a lock file behind.
            self.gate.create_file()
        except Exception as exc:
            self.gate.release()
            if db is not None:
                db.close()
            self.gate.close()
            if isinstance(exc, PubSubError):
                raise
            raise ConfigError(
                f"cannot open Honker database {path!r}: {exc}; it must be a SQLite "
                "database file (or absent) in a writable directory"
            ) from None
        self.gate.release()
        self.db: honker.Database = db
        self.pruner = NotificationPruner(notify_retention) if notify_retention > 0 else None
        self.writer = GroupCommitWriter(self)
        self.refs = 0
        self._next_file_check = time.monotonic() + FILE_CHECK_INTERVAL
        self._watchers: dict[asyncio.AbstractEventLoop, Watcher] = {}
        self._watchers_lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[Job]] = {}

    # -- writing ------------------------------------------------------------------

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
        if time.monotonic() >= self._next_file_check:
            self.check_file()
        if self.lost is not None:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(ConnectionLost(str(self.lost)))
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
        if committed:
            self.writer.prune_if_due()

    def wake_watchers(self, here: asyncio.AbstractEventLoop) -> None:
        """After a commit made on the loop ``here``: wake every watcher of this file."""
        for loop, watcher in list(self._watchers.items()):
            if loop is here:
                watcher.wake()
            else:
                with suppress(RuntimeError):
                    loop.call_soon_threadsafe(watcher.wake)

    def unread_after(self) -> int | None:
        """The lowest notification id up to which every watcher of this process has
        read (None when none reads notifications): the pruner keeps rows above it."""
        positions = [p for w in list(self._watchers.values()) if (p := w.unread_after) is not None]
        return min(positions) if positions else None

    # -- watchers -----------------------------------------------------------------

    def watcher(self, loop: asyncio.AbstractEventLoop) -> Watcher:
        """The watcher of ``loop``, started on first use."""
        with self._watchers_lock:
            if self.lost is not None:
                raise ConnectionLost(str(self.lost))
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

    def discard_watcher(self, watcher: Watcher) -> None:
        """Unregister a watcher that failed, so the next subscription starts a new one."""
        with self._watchers_lock:
            if self._watchers.get(watcher.loop) is watcher:
                del self._watchers[watcher.loop]

    # -- losing the file -------------------------------------------------------------

    def check_file(self) -> None:
        """Mark the database lost if its path no longer names the file opened."""
        self._next_file_check = time.monotonic() + FILE_CHECK_INTERVAL
        if self.lost is None and (how := self.identity.changed(self.path)) is not None:
            self.lose(f"the database file {self.path!r} was {how} while open")

    def watch_failed(self, exc: BaseException) -> None:
        """honker's wake-up watcher died (it does when the file is replaced)."""
        how = self.identity.changed(self.path)
        what = f"was {how} while open" if how else f"can no longer be watched ({exc})"
        self.lose(f"the database file {self.path!r} {what}")

    def lose(self, reason: str) -> None:
        """Fail everything on this database for good (idempotent); see the module docstring."""
        with self._watchers_lock:
            if self.lost is not None:
                return
            self.lost = ConnectionLost(
                f"{reason}; nothing more is read or written through it: close this "
                "transport (or store) and open the path again"
            )
            watchers, self._watchers = list(self._watchers.values()), {}
        with _registry_lock:
            if _registry.get(self.path) is self:
                del _registry[self.path]
                _lost[self.path] = self
        log.error("%s", self.lost)
        for watcher in watchers:
            with suppress(RuntimeError):  # that loop is closed
                watcher.loop.call_soon_threadsafe(watcher.fail, ConnectionLost(str(self.lost)))

    # -- closing ----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Commit what is queued, stop the watchers, close honker, then the gate."""
        self.writer.stop()
        with self._watchers_lock:
            watchers, self._watchers = list(self._watchers.values()), {}
        for watcher in watchers:
            with suppress(RuntimeError):
                watcher.loop.call_soon_threadsafe(watcher.stop)
        self.db.close()
        self.gate.close()  # after honker: see gate.py on closing descriptors


_registry: dict[str, SharedDatabase] = {}
_lost: dict[str, SharedDatabase] = {}
"""Lost databases still open here, by path: the path cannot be opened again until
they close, or the new file would share the old one's -wal and -shm."""
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
    if os.path.isdir(resolved):
        raise ConfigError(
            f"the Honker database {text!r} is a directory; give the path of a file in it, "
            f"e.g. {os.path.join(text, 'events.db')!r}"
        )
    return resolved


def acquire(path: str, busy_timeout: float, notify_retention: float) -> SharedDatabase:
    """The shared database of the resolved ``path``, opened if needed, with one
    more reference counted on it."""
    with _registry_lock:
        if (lost := _lost.get(path)) is not None:
            raise ConnectionLost(
                f"{lost.lost}; {lost.refs} handle(s) on the old file are still open in this "
                "process: close them all first (the new file would share the old one's "
                "-wal and -shm)"
            )
        shared = _registry.get(path)
        if shared is None:
            shared = _registry[path] = SharedDatabase(path, busy_timeout, notify_retention)
        shared.refs += 1
        return shared


def release(shared: SharedDatabase) -> None:
    """Drop one reference; the last one closes the database."""
    with _registry_lock:
        shared.refs -= 1
        if shared.refs > 0:
            return
        if _registry.get(shared.path) is shared:
            del _registry[shared.path]
        if _lost.get(shared.path) is shared:
            del _lost[shared.path]
    shared.shutdown()


@atexit.register
def _flush_writers() -> None:
    # Commit what publishers queued before the interpreter goes away.
    with _registry_lock:
        shared = list(_registry.values())
    for each in shared:
        each.writer.stop(timeout=5.0)
