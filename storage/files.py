"""The files of one Honker database: created owner-only, watched for replacement.

A database file, its ``-wal``/``-shm`` and our ``<db>-alkpubsub.lock`` hold
every event; by default nobody but their owner may read them. SQLite creates
``-wal`` and ``-shm`` with the main file's mode (it ``fchmod``s them to match,
whatever the umask), so creating the main file 0600 before honker opens it
makes all three 0600. A file that already exists keeps its mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from alkpubsub.errors import ConfigError

PRIVATE_MODE = 0o600


def create_private(path: str) -> int | None:
    """Create ``path`` with mode 0600 (whatever the umask) and return its open
    descriptor, or return None if it already exists (its mode is left alone)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_MODE)
    except FileExistsError:
        return None
    except OSError as exc:
        raise _cannot_create(path, exc) from None
    try:
        # os.open applies the umask; a umask like 0o277 would leave 0400.
        os.fchmod(fd, PRIVATE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def create_private_database(path: str) -> None:
    """Create the empty database file ``path`` owner-only if it does not exist yet
    (SQLite treats an empty file as an empty database)."""
    fd = create_private(path)
    if fd is not None:
        # Safe to close: no SQLite connection of this process has this new file
        # open, so no POSIX lock can be lost by closing a descriptor on it.
        os.close(fd)


def open_lock_file(path: str) -> int:
    """Open the sidecar lock file ``path``, creating it owner-only if missing."""
    fd = create_private(path)
    if fd is not None:
        return fd
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise _cannot_create(path, exc) from None


def open_existing(path: str) -> int | None:
    """Open ``path`` read-write if it exists, else None."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _cannot_create(path, exc) from None


def _cannot_create(path: str, exc: OSError) -> ConfigError:
    return ConfigError(
        f"cannot open or create {path!r}: {exc.strerror or exc}; the directory must be "
        "writable by this user and the path must not be a directory"
    )


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """Which file a path named when the database was opened (device and inode)."""

    device: int
    inode: int

    @classmethod
    def of(cls, path: str) -> FileIdentity:
        """The identity of the file at ``path`` now."""
        st = os.stat(path)
        return cls(st.st_dev, st.st_ino)

    def changed(self, path: str) -> str | None:
        """None while ``path`` still names this file, else "deleted" or "replaced"."""
        try:
            now = FileIdentity.of(path)
        except FileNotFoundError:
            return "deleted"
        except OSError:
            return None  # cannot tell (e.g. a transient error): do not cry wolf
        return None if now == self else "replaced"
