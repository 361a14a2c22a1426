"""What the Honker transports share: the URL -> file rule, opening the store, and
(for ``honker+durable``) reading stream rows, consumer leases and dead letters.

URL -> file
    ``honker:///abs/path.db``       the absolute path ``/abs/path.db``
    ``honker:///./rel.db``          ``./rel.db``, relative to the working directory
                                     (also ``honker:///../rel.db``)
    ``honker://./rel.db``           the same relative path, written without the third slash
    Any other host part (``honker://events.db``) is refused: it would silently be a
    host name, not a file. ``:memory:`` is refused (honker's readers could not see it).
    The same rules hold for ``honker+durable://``.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import uuid
from typing import Any

from alkpubsub.capabilities import Start
from alkpubsub.config import ParsedUrl
from alkpubsub.errors import ConfigError, ConsumerBusy, InvalidTopic
from alkpubsub.event import Event
from alkpubsub.storage import (
    DEFAULT_NOTIFY_RETENTION,
    Store,
    StoreTransaction,
    build_event,
    open_store,
)
from alkpubsub.topics import dead_letter_topic


def database_path(url: ParsedUrl) -> str:
    """The database file a ``honker://`` or ``honker+durable://`` URL names (see above)."""
    host = url.host or ""
    path = url.path
    example = f"{url.scheme}:///./events.db (relative) or {url.scheme}:///var/lib/app/events.db"
    if host in (".", ".."):
        path = host + path
    elif host:
        raise ConfigError(
            f"{url.redacted!r} names host {host!r}, but Honker is a local file; "
            f"write {url.scheme}:///./{host}{path} or another path, e.g. {example}"
        )
    elif path.startswith(("/./", "/../")):
        path = path[1:]
    if path.strip("/.") == "" or path.endswith("/"):
        raise ConfigError(f"{url.redacted!r} names no database file; use e.g. {example}")
    if path.rsplit("/", 1)[-1] == ":memory:":
        raise ConfigError(
            f"{url.redacted!r}: Honker cannot use an in-memory database (its reader "
            f"connections would not see it); use a file, e.g. {example}"
        )
    return path


class StoreHolder:
    """Opens the transport's store on first use, off the event loop."""

    def __init__(
        self, path: str, origin: str, notify_retention: float = DEFAULT_NOTIFY_RETENTION
    ) -> None:
        self.path = path
        self.origin = origin
        self.notify_retention = notify_retention
        self.store: Store | None = None
        self._opening: asyncio.Lock | None = None

    async def get(self) -> Store:
        if self.store is not None:
            return self.store
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self.store is None:
                # Opening may create the file and wait for another writer: not on the loop.
                self.store = await asyncio.to_thread(self._open)
        return self.store

    def open_now(self) -> Store:
        """Open synchronously (for callers outside the event loop)."""
        if self.store is None:
            self.store = self._open()
        return self.store

    def _open(self) -> Store:
        return open_store(self.path, origin=self.origin, notify_retention=self.notify_retention)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


# -- durable stream rows --------------------------------------------------------

SELECT_ROWS = (
    "SELECT offset, payload FROM _honker_stream WHERE topic = ? AND offset > ? "
    "ORDER BY offset LIMIT ?"
)
MAX_OFFSET = "SELECT COALESCE(MAX(offset), 0) AS m FROM _honker_stream WHERE topic = ?"

# alkpubsub writes envelopes as {"alkpubsub":1,"id":"...","topic":"...",...} (before
# wire format v1 without the version): reading the topic with a regex lets a reader
# skip rows of other topics without parsing them (test_honker_durable checks it
# matches what Event.envelope writes).
_ENVELOPE_TOPIC = re.compile(
    r'\{(?:"alkpubsub":[0-9]+,)?"id":"[^"\\]*","topic":"([A-Za-z0-9_.:\-]+)"'
)


def envelope_topic(text: str) -> str | None:
    """The topic of an envelope written by alkpubsub, or None (parse it fully)."""
    found = _ENVELOPE_TOPIC.match(text)
    return found.group(1) if found else None


def place_offset(event: Event, offset: int) -> Event:
    """Set ``offset`` on an event just parsed from a row. The event is new and not
    shared yet, so writing the field directly is safe, and 30x cheaper than
    ``model_copy``; pydantic keeps field values in ``__dict__``."""
    event.__dict__["offset"] = offset
    return event


FALLBACK_DEAD_TOPIC = "dead"
"""Where an event goes whose ``<topic>:dead`` would break the topic length limit."""


def dead_letter(
    topic: str,
    payload: Any,
    headers: dict[str, str],
    offset: int,
    consumer: str | None,
    origin: str,
) -> tuple[Event, str]:
    """The dead letter (event and envelope) for the event of ``topic`` at ``offset``."""
    headers = {
        **headers,
        "x-original-topic": topic,
        "x-original-offset": str(offset),
        "x-consumer": consumer or "",
    }
    try:
        return build_event(dead_letter_topic(topic), payload, origin=origin, headers=headers)
    except InvalidTopic:
        return build_event(FALLBACK_DEAD_TOPIC, payload, origin=origin, headers=headers)


def start_position(query: Any, stream: str, start: Start) -> int:
    """The offset a reader without a saved position continues after."""
    if start == "earliest":
        return 0
    if start == "new":
        return int(query(MAX_OFFSET, [stream])[0]["m"])
    return max(int(start) - 1, 0)


# -- named consumers: one live subscription per name, across processes ----------

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
    """The claim of one named consumer on one stream, held in honker's
    ``_honker_locks`` (a lease renewed every ``ttl / 3`` seconds), plus the
    consumer's saved position in ``_honker_stream_consumers``.

    A holder that crashed frees the name at once when it ran on this host (its
    pid is gone), else when its lease expires after ``ttl`` seconds.
    """

    def __init__(self, store: Store, stream: str, consumer: str, ttl: int) -> None:
        self.store = store
        self.stream = stream
        self.consumer = consumer
        self.ttl = ttl
        self.lock = f"alkpubsub:consumer:{stream}:{consumer}"
        self.owner = f"{_HOST}|{os.getpid()}|{uuid.uuid4().hex[:12]}"

    async def claim(self, start: Start) -> int:
        """Take the name; return the position to continue after, or raise ConsumerBusy."""
        result = await self.store.write(lambda tx: self._claim(tx, start), short=True)
        if isinstance(result, str):
            raise ConsumerBusy(
                f"consumer {self.consumer!r} of stream {self.stream!r} in {self.store.path!r} "
                f"is in use by {result}; close that subscription or pick another consumer name"
            )
        _live_owners.add(self.owner)
        return result

    def _claim(self, tx: StoreTransaction, start: Start) -> int | str:
        acquire = "SELECT honker_lock_acquire(?, ?, ?) AS r"
        if not tx.query(acquire, [self.lock, self.owner, self.ttl])[0]["r"]:
            rows = tx.query(
                "SELECT owner, expires_at - unixepoch() AS left FROM _honker_locks WHERE name = ?",
                [self.lock],
            )
            holder, left = (rows[0]["owner"], rows[0]["left"]) if rows else ("?", 0)
            if not _holder_is_gone(holder):
                host, _, rest = holder.partition("|")
                pid = rest.partition("|")[0]
                here = host == _HOST and pid == str(os.getpid())
                who = "this process" if here else f"process {pid} on {host}"
                return f"{who} (its lease runs {left} s more unless renewed)"
            tx.execute(
                "DELETE FROM _honker_locks WHERE name = ? AND owner = ?", [self.lock, holder]
            )
            tx.query(acquire, [self.lock, self.owner, self.ttl])
        saved = tx.query(
            "SELECT offset FROM _honker_stream_consumers WHERE name = ? AND topic = ?",
            [self.consumer, self.stream],
        )
        if saved:
            return int(saved[0]["offset"])
        position = start_position(tx.query, self.stream, start)
        # Registering now makes the consumer resume from here after a crash and
        # holds back pruning of what it has not read.
        tx.execute(
            "INSERT INTO _honker_stream_consumers (name, topic, offset) VALUES (?, ?, ?)",
            [self.consumer, self.stream, position],
        )
        return position

    async def renew(self) -> bool:
        """Extend the lease; False when it was lost (expired and taken by another)."""
        sql = "SELECT honker_lock_renew(?, ?, ?) AS r"
        params = [self.lock, self.owner, self.ttl]
        return bool(await self.store.write(lambda tx: tx.query(sql, params)[0]["r"], short=True))

    async def save(self, offset: int) -> None:
        """Persist the position (monotonic: it never moves back)."""
        await self.store.write(lambda tx: self._save(tx, offset), short=True)

    def _save(self, tx: StoreTransaction, offset: int) -> None:
        tx.query(
            "SELECT honker_stream_save_offset(?, ?, ?) AS r", [self.consumer, self.stream, offset]
        )

    async def release(self, offset: int) -> None:
        """Save the final position and free the name, in one commit."""
        _live_owners.discard(self.owner)

        def release(tx: StoreTransaction) -> None:
            self._save(tx, offset)
            tx.query("SELECT honker_lock_release(?, ?) AS r", [self.lock, self.owner])

        await self.store.write(release, short=True)
