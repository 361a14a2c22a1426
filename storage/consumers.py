"""Named durable consumers of a honker stream: their leases and saved positions.

alkpubsub keeps each named consumer's position in honker's
``_honker_stream_consumers`` under the reserved name ``alkpubsub:<consumer>``
(:data:`CONSUMER_PREFIX`). Consumer names given to alkpubsub are
``[A-Za-z0-9_.-]`` and never contain ``:``, so a consumer that honker's own
``stream.subscribe(consumer="worker")`` keeps (row name ``worker``) and
alkpubsub's ``worker`` (row name ``alkpubsub:worker``) never move each other.
Both hold back pruning. ``alkpubsub stats`` lists both kinds. A consumer with
no prefixed row yet starts from the bare-name row if there is one (where
versions before the prefix saved it), without ever writing that row.

The claim on a name is a lease in honker's ``_honker_locks``
(``alkpubsub:consumer:<stream>:<consumer>``), renewed every ``ttl / 3`` seconds.
A holder that crashed frees the name at once when it ran on this host (its pid
is gone), else when its lease expires after ``ttl`` seconds.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from alkpubsub.capabilities import Start
from alkpubsub.errors import ConsumerBusy

if TYPE_CHECKING:
    from .transaction import StoreTransaction

Write = Callable[..., Awaitable[Any]]
"""``store.write``: runs ``fn(tx)`` in the next group commit (``short=`` keyword)."""

CONSUMER_PREFIX = "alkpubsub:"
"""The prefix of alkpubsub's rows in ``_honker_stream_consumers``."""

STREAM_HEAD = "SELECT COALESCE(MAX(offset), 0) AS m FROM _honker_stream WHERE topic = ?"
ROWS_AFTER = (
    "SELECT offset, key, payload, created_at FROM _honker_stream "
    "WHERE topic = ? AND offset > ? ORDER BY offset LIMIT ?"
)
CONSUMERS = "SELECT name, offset FROM _honker_stream_consumers WHERE topic = ? ORDER BY name"
SAVED = "SELECT offset FROM _honker_stream_consumers WHERE name = ? AND topic = ?"
REGISTER = "INSERT INTO _honker_stream_consumers (name, topic, offset) VALUES (?, ?, ?)"
REMOVE = "DELETE FROM _honker_stream_consumers WHERE name = ? AND topic = ?"
SAVE = "SELECT honker_stream_save_offset(?, ?, ?) AS r"
LOCK_ACQUIRE = "SELECT honker_lock_acquire(?, ?, ?) AS r"
LOCK_RENEW = "SELECT honker_lock_renew(?, ?, ?) AS r"
LOCK_RELEASE = "SELECT honker_lock_release(?, ?) AS r"
LOCK_HOLDER = "SELECT owner, expires_at - unixepoch() AS left FROM _honker_locks WHERE name = ?"
LOCK_BREAK = "DELETE FROM _honker_locks WHERE name = ? AND owner = ?"


def row_name(consumer: str) -> str:
    """The name alkpubsub's consumer ``consumer`` has in ``_honker_stream_consumers``."""
    return CONSUMER_PREFIX + consumer


@dataclass(frozen=True, slots=True)
class StreamConsumer:
    """One row of ``_honker_stream_consumers``: alkpubsub's or honker's own."""

    name: str
    """The consumer's name as its owner knows it (without the prefix)."""
    kind: str
    """``alkpubsub`` or ``honker`` (a consumer of honker's ``stream.subscribe``)."""
    offset: int


def list_consumers(query: Any, stream: str) -> list[StreamConsumer]:
    """Every consumer of ``stream``, both kinds, by name."""
    found = []
    for row in query(CONSUMERS, [stream]):
        name, offset = row["name"], int(row["offset"])
        if isinstance(name, str) and name.startswith(CONSUMER_PREFIX):
            found.append(StreamConsumer(name[len(CONSUMER_PREFIX) :], "alkpubsub", offset))
        else:
            found.append(StreamConsumer(str(name), "honker", offset))
    return found


def start_position(query: Any, stream: str, start: Start) -> int:
    """The offset a reader without a saved position continues after."""
    if start == "earliest":
        return 0
    if start == "new":
        return int(query(STREAM_HEAD, [stream])[0]["m"])
    return max(int(start) - 1, 0)


_HOST = socket.gethostname()
_live_owners: set[str] = set()


def _holder_is_gone(owner: str) -> bool:
    """True when the lease holder is a process on this host that no longer runs,
    or a subscription of this process that was dropped without closing."""
    host, _, rest = owner.partition("|")
    pid_text = rest.partition("|")[0]
    if host != _HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return owner not in _live_owners
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class ConsumerLease:
    """The claim of one named consumer on one stream, and its saved position
    (see the module docstring)."""

    def __init__(self, write: Write, path: str, stream: str, consumer: str, ttl: int) -> None:
        self._write = write
        self.path = path
        self.stream = stream
        self.consumer = consumer
        self.ttl = ttl
        self.row = row_name(consumer)
        self.lock = f"alkpubsub:consumer:{stream}:{consumer}"
        self.owner = f"{_HOST}|{os.getpid()}|{uuid.uuid4().hex[:12]}"

    async def claim(self, start: Start) -> int:
        """Take the name; return the position to continue after, or raise ConsumerBusy."""
        result: int | str = await self._write(lambda tx: self._claim(tx, start), short=True)
        if isinstance(result, str):
            raise ConsumerBusy(
                f"consumer {self.consumer!r} of stream {self.stream!r} in {self.path!r} "
                f"is in use by {result}; close that subscription or pick another consumer name"
            )
        _live_owners.add(self.owner)
        return result

    def _claim(self, tx: StoreTransaction, start: Start) -> int | str:
        if not tx.query(LOCK_ACQUIRE, [self.lock, self.owner, self.ttl])[0]["r"]:
            rows = tx.query(LOCK_HOLDER, [self.lock])
            holder, left = (rows[0]["owner"], rows[0]["left"]) if rows else ("?", 0)
            if not _holder_is_gone(holder):
                host, _, rest = holder.partition("|")
                pid = rest.partition("|")[0]
                here = host == _HOST and pid == str(os.getpid())
                who = "this process" if here else f"process {pid} on {host}"
                return f"{who} (its lease runs {left} s more unless renewed)"
            tx.execute(LOCK_BREAK, [self.lock, holder])
            tx.query(LOCK_ACQUIRE, [self.lock, self.owner, self.ttl])
        saved = tx.query(SAVED, [self.row, self.stream])
        if saved:
            return int(saved[0]["offset"])
        # Versions before the prefix saved under the bare name: continue from that
        # position (read, never written: it may be a honker consumer's row now).
        legacy = tx.query(SAVED, [self.consumer, self.stream])
        if legacy:
            position = int(legacy[0]["offset"])
        else:
            position = start_position(tx.query, self.stream, start)
        # Registering now makes the consumer resume from here after a crash and
        # holds back pruning of what it has not read.
        tx.execute(REGISTER, [self.row, self.stream, position])
        return position

    async def renew(self) -> bool:
        """Extend the lease; False when it was lost (expired and taken by another)."""
        params = [self.lock, self.owner, self.ttl]
        return bool(await self._write(lambda tx: tx.query(LOCK_RENEW, params)[0]["r"], short=True))

    async def save(self, offset: int) -> None:
        """Persist the position (monotonic: it never moves back)."""
        await self._write(lambda tx: self._save(tx, offset), short=True)

    def _save(self, tx: StoreTransaction, offset: int) -> None:
        tx.query(SAVE, [self.row, self.stream, offset])

    async def release(self, offset: int) -> None:
        """Save the final position and free the name, in one commit."""
        _live_owners.discard(self.owner)

        def release(tx: StoreTransaction) -> None:
            self._save(tx, offset)
            tx.query(LOCK_RELEASE, [self.lock, self.owner])

        await self._write(release, short=True)
