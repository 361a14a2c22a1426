"""The write gate: mutual exclusion of alkpubsub writers on one database file.

honker holds the GIL while SQLite waits for a lock another process holds, so a
thread waiting there would freeze the event loop. Every alkpubsub write first
takes this gate instead: threads of this process wait on a mutex, processes on
``flock`` of a sidecar file (``<db>-alkpubsub.lock``); both waits release the
GIL. SQLite's own busy wait is then reached only when the file is free (or a
writer outside alkpubsub holds it).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time

from alkpubsub.errors import PublishError, PubSubError


class WriteGate:
    """Mutual exclusion of alkpubsub writers on one database file, waited for
    with the GIL released. Writes through ``store.honker`` directly bypass it."""

    def __init__(self, db_path: str, timeout: float) -> None:
        self.path = f"{db_path}-alkpubsub.lock"
        self.timeout = timeout
        self._mutex = threading.Lock()
        self._holder: int | None = None
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def acquire(self) -> None:
        """Wait up to ``timeout`` seconds for the write lock, or raise :class:`PublishError`."""
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
            delay = 0.0002
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise self._busy() from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.005)
        except BaseException:
            self._mutex.release()
            raise
        self._holder = me

    def try_acquire(self) -> bool:
        """Take the lock only if no writer of this process or another holds it."""
        if not self._mutex.acquire(blocking=False):
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._mutex.release()
            return False
        self._holder = threading.get_ident()
        return True

    def release(self) -> None:
        self._holder = None
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._mutex.release()

    def close(self) -> None:
        os.close(self._fd)

    def _busy(self) -> PublishError:
        return PublishError(
            f"another writer held {self.path.removesuffix('-alkpubsub.lock')!r} for more than "
            f"{self.timeout} s; shorten long store transactions or raise busy_timeout"
        )
