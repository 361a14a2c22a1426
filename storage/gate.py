"""The write gate: mutual exclusion of writers on one database file, waited for
with the GIL released.

honker holds the GIL while SQLite waits for a lock another process holds, so a
thread waiting there would freeze the event loop. Every alkpubsub write first
takes this gate instead:

- threads of this process wait on a mutex;
- alkpubsub processes wait on ``flock`` of a sidecar file (``<db>-alkpubsub.lock``,
  created 0600 once the database opened, so a failed open leaves none);
- any other SQLite client (``sqlite3``, a migration tool) holding the database's
  write transaction is seen by asking the kernel who holds SQLite's WAL write
  lock: byte 120 of ``<db>-shm``, part of SQLite's documented WAL file format.
  ``F_GETLK`` only reports other processes' locks and takes none, costs ~1.5 us
  (measured), and the descriptor stays open until honker closed the database,
  because closing any descriptor of a file drops this process's POSIX locks on it.

SQLite's own busy wait (GIL held) is then reached only when the file is free,
or when another client takes the lock in the microseconds between our check
and our ``BEGIN``.
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys
import threading
import time

from alkpubsub.errors import DatabaseBusy, PubSubError

from .files import open_existing, open_lock_file

WAL_WRITE_LOCK_BYTE = 120
"""Offset of SQLite's WAL write lock in the -shm file (https://sqlite.org/walformat.html)."""

# struct flock on Linux (x86_64 and aarch64): short type, short whence, off_t
# start, off_t len, pid_t pid, padded to 32 bytes. Other systems lay it out
# differently, so the check is Linux-only; elsewhere SQLite's busy wait remains.
_FLOCK = "hhqqi4x"
_PROBE = (
    struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, WAL_WRITE_LOCK_BYTE, 1, 0)
    if sys.platform.startswith("linux")
    else None
)


class WriteGate:
    """Mutual exclusion of writers on one database file (see the module docstring).
    Writes through ``store.honker`` directly bypass it."""

    def __init__(self, db_path: str, timeout: float) -> None:
        self.db_path = db_path
        self.path = f"{db_path}-alkpubsub.lock"
        self.timeout = timeout
        self._mutex = threading.Lock()
        self._holder: int | None = None
        # Only an existing lock file is used before the database opened; see create_file.
        self._fd: int | None = open_existing(self.path)
        self._shm: int | None = None

    def create_file(self) -> None:
        """Once the database opened: create the lock file if it is missing and start
        watching SQLite's write lock for writers outside alkpubsub."""
        if self._fd is None:
            self._fd = open_lock_file(self.path)
        if self._shm is None and _PROBE is not None:
            self._shm = open_existing(self.db_path + "-shm")

    def acquire(self) -> None:
        """Wait up to ``timeout`` seconds for the write lock, or raise
        :class:`DatabaseBusy` (a :class:`PublishError` and a :class:`StorageError`)."""
        me = threading.get_ident()
        if self._holder == me:
            raise PubSubError(
                "a write transaction on this database is already open in this thread; "
                "nested store.transaction() is not supported: use the open transaction's tx"
            )
        deadline = time.monotonic() + self.timeout
        if not self._mutex.acquire(timeout=self.timeout):
            raise self._busy()
        try:
            self._wait_for_processes(deadline)
        except BaseException:
            self._mutex.release()
            raise
        self._holder = me

    def try_acquire(self) -> bool:
        """Take the lock only if no writer of this process or another holds it."""
        if not self._mutex.acquire(blocking=False):
            return False
        fd = self._fd
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._mutex.release()
                return False
        if self.foreign_writer() is not None:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._mutex.release()
            return False
        self._holder = threading.get_ident()
        return True

    def held_here(self) -> bool:
        """True if the calling thread holds the gate."""
        return self._holder == threading.get_ident()

    def release(self) -> None:
        self._holder = None
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._mutex.release()

    def foreign_writer(self) -> int | None:
        """The pid of another process holding SQLite's write lock on the file, or None."""
        shm = self._shm
        if shm is None or _PROBE is None:
            return None
        try:
            answer = fcntl.fcntl(shm, fcntl.F_GETLK, _PROBE)
        except OSError:
            return None
        kind, _, _, _, pid = struct.unpack(_FLOCK, answer)
        return None if kind == fcntl.F_UNLCK else int(pid)

    def close(self) -> None:
        """Close the descriptors; call only after honker closed the database."""
        for fd in (self._fd, self._shm):
            if fd is not None:
                os.close(fd)
        self._fd = self._shm = None

    def _wait_for_processes(self, deadline: float) -> None:
        delay = 0.0002
        fd = self._fd
        locked = fd is None
        while True:
            if not locked:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # type: ignore[arg-type]
                    locked = True
                except BlockingIOError:
                    pass
            other = None if not locked else self.foreign_writer()
            if locked and other is None:
                return
            if time.monotonic() >= deadline:
                if locked and fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                raise self._busy(other)
            time.sleep(delay)  # releases the GIL
            delay = min(delay * 2, 0.005)

    def _busy(self, pid: int | None = None) -> DatabaseBusy:
        who = f"process {pid} (not alkpubsub)" if pid is not None else "another writer"
        return DatabaseBusy(
            f"{who} held {self.db_path!r} for more than {self.timeout} s; shorten long "
            "store transactions or raise busy_timeout"
        )
