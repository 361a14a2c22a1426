"""One wake-up watcher per Honker database and event loop.

honker's ``update_events()`` yields once per commit seen on the file (any
process). The watcher owns the only such iterator for its database in this
event loop. On each wake it runs ONE query for new notifications and fans the
rows out in memory through a :class:`Router`, so the cost of a commit does not
grow with the number of subscribed topics; then it wakes every durable stream
reader, which reads from its own position. Commits made by this process also
poke it directly, so local subscribers need not wait for honker's 1 ms poll.

Rows come from any SQLite client, so no row's content may stop the watcher.
Each row is parsed once and decoded by :mod:`alkpubsub.storage.rows` (our
envelopes, CloudEvents, foreign JSON or text from honker's own ``tx.notify``).
A row whose channel or payload is not text (a BLOB), is not UTF-8, claims to
be an envelope but is invalid, or whose envelope names another topic than its
channel is counted as malformed on the subscriptions it was meant for (on
every one when its channel names no topic) and skipped. An exception nobody foresaw while
handling one row is logged once and counted in :attr:`Watcher.errors`, and the
watcher goes on with the next row.

The watcher stops only for a real reason, and then loudly: if the file is
replaced or deleted (checked every second, and honker's own watcher notices a
replacement), the whole database is marked lost (see
``SharedDatabase.lose``); if reading fails, this watcher fails its
subscriptions with :class:`ConnectionLost` and unregisters, so the next
subscription starts a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Container
from typing import TYPE_CHECKING, Any, Protocol

from alkpubsub.errors import ConnectionLost
from alkpubsub.event import Event
from alkpubsub.routing import Router
from alkpubsub.topics import MAX_TOPIC_LENGTH, Pattern

from .rows import Malformed, RowDecoder, parse_row

if TYPE_CHECKING:
    from .store import SharedDatabase

log = logging.getLogger("alkpubsub.storage")

READ_BATCH = 256
"""Notification rows per query; the watcher yields to the loop between batches."""
TICK = 1.0
"""Seconds between checks that the database file is still the one opened."""
FALLBACK_TICKS = 5
"""Ticks after which the watcher reads even without a wake (a missed wake costs at most 5 s)."""
MAX_DEFERRED = 32
"""Wakes in a row the watcher may skip because this loop has a commit queued
for its next turn (that commit wakes it again, so one read serves both)."""
MAX_DEFER_AGE = 0.001
"""Seconds after the first skipped wake by which the watcher reads regardless."""

SELECT_NOTIFICATIONS = (
    "SELECT id, channel, payload, created_at FROM _honker_notifications "
    "WHERE id > ? ORDER BY id LIMIT ?"
)
MAX_NOTIFICATION_ID = "SELECT COALESCE(MAX(id), 0) AS m FROM _honker_notifications"


class Listener(Protocol):
    """A live subscription to notifications (the ``honker://`` transport's)."""

    after_id: int
    """Deliver only rows with a larger id (set when it is added)."""
    skip_origin: str | None
    """Our envelopes of this origin are skipped before decoding (composite echoes)..."""
    keep_ids: Container[str]
    """...unless their id is here."""

    @property
    def pattern(self) -> Pattern: ...

    @property
    def decoder(self) -> RowDecoder:
        """How this subscription reads rows (its transport's ``foreign`` option)."""
        ...

    def push(self, event: Event) -> None: ...

    def count_malformed(self, detail: str, kind: str) -> None:
        """Count a row meant for this subscription that is no event for it."""
        ...

    def fail(self, error: BaseException) -> None: ...


class Reader(Protocol):
    """A durable stream reader (the ``honker+durable://`` transport's)."""

    def wake(self, local: bool = False) -> None:
        """A commit may have added rows; ``local``: only this process's own commits."""
        ...

    def fail(self, error: BaseException) -> None: ...


class Watcher:
    """Wakes on every commit to one database and feeds this loop's subscribers."""

    def __init__(self, shared: SharedDatabase, loop: asyncio.AbstractEventLoop) -> None:
        self._shared = shared
        self._db = shared.db
        self.loop = loop
        self._router: Router[Listener] = Router()
        self._listeners: set[Listener] = set()
        self._readers: set[Reader] = set()
        self._cursor = 0
        self._signal = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._fallback: asyncio.TimerHandle | None = None
        self._ticks = 0
        self._stopped = False
        self._external = True  # a wake not (only) from this process's commits
        self.wakes = 0
        """Wake-ups processed (for tests and stats)."""
        self.errors = 0
        """Rows whose handling raised something unforeseen (logged once, then skipped)."""

    def start(self) -> None:
        # Subscribe to wake-ups before anything reads, so a commit that lands
        # between a snapshot and the first wait still wakes us.
        updates = self._db.update_events()
        self._tasks = [
            self.loop.create_task(self._pump(updates), name="alkpubsub-honker-pump"),
            self.loop.create_task(self._run(), name="alkpubsub-honker-watcher"),
        ]
        self._fallback = self.loop.call_later(TICK, self._tick)

    def stop(self) -> None:
        """Cancel the watcher's tasks (on its loop)."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self._fallback is not None:
            self._fallback.cancel()
            self._fallback = None

    def _tick(self) -> None:
        # One timer for the watcher's life, not one per wait: arming and
        # cancelling a timeout on every wake cost more than the wake itself.
        self._fallback = self.loop.call_later(TICK, self._tick)
        self._shared.check_file()  # a stat, ~2 us; may fail every watcher of the file
        self._ticks += 1
        if self._ticks % FALLBACK_TICKS == 0:
            self._external = True
            self._signal.set()

    @property
    def idle(self) -> bool:
        """True when nothing is subscribed through this watcher."""
        return not self._router and not self._readers

    def wake(self) -> None:
        """Read now (called on the loop, e.g. after a local commit)."""
        self._signal.set()

    # -- subscriptions ----------------------------------------------------

    def add_listener(self, sub: Listener) -> None:
        """Deliver to ``sub`` every notification committed from now on, and none before."""
        snapshot = self.max_notification_id()
        if not self._router:
            self._cursor = snapshot
        sub.after_id = snapshot
        self._router.add(sub)
        self._listeners.add(sub)

    def remove_listener(self, sub: Listener) -> None:
        if sub in self._listeners:
            self._listeners.discard(sub)
            self._router.remove(sub)
        self._shared.release_watcher(self)

    def add_reader(self, reader: Reader) -> None:
        self._readers.add(reader)

    def remove_reader(self, reader: Reader) -> None:
        self._readers.discard(reader)
        self._shared.release_watcher(self)

    def max_notification_id(self) -> int:
        """The highest notification id in the file now."""
        return int(self._db.query(MAX_NOTIFICATION_ID)[0]["m"])

    @property
    def unread_after(self) -> int | None:
        """Notifications above this id may still be read here (None: none will be)."""
        return self._cursor if self._router and not self._stopped else None

    def fail(self, error: BaseException) -> None:
        """Stop, and make every subscription fed by this watcher raise ``error`` (on its loop)."""
        self.stop()
        for listener in list(self._listeners):
            listener.fail(error)
        for reader in list(self._readers):
            reader.fail(error)

    # -- the loop ----------------------------------------------------------

    async def _pump(self, updates: Any) -> None:
        try:
            while True:
                await updates.__anext__()
                self._external = True
                self._signal.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # honker's watcher died: the file was replaced or closed
            self._shared.watch_failed(exc)

    async def _run(self) -> None:
        signal = self._signal
        loop = self.loop
        commit_queued = self._shared.commit_queued
        deferred = 0
        first_deferred = 0.0
        while True:
            await signal.wait()
            signal.clear()
            # A burst of local publishes: when this loop has another commit
            # queued for its next turn, skip this read; that commit (or its
            # failure) wakes us again and one read then serves both. Bounded,
            # so a steady stream of publishes still delivers every ~1 ms. A
            # lone publish (1 in flight) has nothing queued and is read at once.
            if deferred < MAX_DEFERRED and commit_queued(loop):
                if deferred == 0:
                    first_deferred = loop.time()
                if loop.time() - first_deferred < MAX_DEFER_AGE:
                    deferred += 1
                    continue
            deferred = 0
            self.wakes += 1
            try:
                if self._router:
                    await self._drain()
                local, self._external = not self._external, False
                for reader in list(self._readers):
                    reader.wake(local)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the query failed: a disk or file problem
                error = ConnectionLost(
                    f"reading notifications from {self._shared.path!r} failed ({exc}); "
                    "subscribe again once the file is readable"
                )
                log.error("%s", error)
                self._shared.discard_watcher(self)  # the next subscription gets a new one
                self.fail(error)
                return

    async def _drain(self) -> None:
        query = self._db.query
        while self._router:
            rows = query(SELECT_NOTIFICATIONS, [self._cursor, READ_BATCH])
            if not rows:
                return
            self._dispatch(rows)
            self._cursor = rows[-1]["id"]
            if len(rows) < READ_BATCH:
                return
            await asyncio.sleep(0)

    def _dispatch(self, rows: list[dict[str, Any]]) -> None:
        match = self._router.match
        for row in rows:
            # try costs nothing in 3.11 unless it raises: one per row keeps one
            # unforeseen failure from losing the rest of the batch.
            try:
                channel = row["channel"]
                if type(channel) is not str or len(channel) > MAX_TOPIC_LENGTH:
                    self._foreign_channel(row)
                    continue
                subs = match(channel)
                if not subs:
                    continue
                row_id = row["id"]
                # Parsed once per row; decoded once per decoder (subscriptions of
                # transports with the same ``foreign`` option share it).
                parsed = None
                decoded: dict[RowDecoder, Event | Malformed] = {}
                for sub in subs:
                    if row_id <= sub.after_id:
                        continue
                    if parsed is None:
                        parsed = parse_row(row["payload"], channel)
                    skip = sub.skip_origin
                    if (
                        skip is not None
                        and parsed.kind == "ours"
                        and parsed.value.get("origin") == skip
                        and parsed.value.get("id") not in sub.keep_ids
                    ):
                        continue  # an echo this subscriber does not want
                    decoder = sub.decoder
                    event = decoded.get(decoder)
                    if event is None:
                        event = decoder.decode(parsed, channel, row_id, row["created_at"])
                        decoded[decoder] = event
                    try:
                        if isinstance(event, Malformed):
                            detail = f"notification {row_id} on {channel!r}: {event.detail}"
                            sub.count_malformed(detail, event.kind)
                        else:
                            sub.push(event)
                    except Exception as exc:  # one subscription's fault is its own
                        self._unforeseen(row, exc)
            except Exception as exc:
                self._unforeseen(row, exc)

    def _foreign_channel(self, row: dict[str, Any]) -> None:
        """A channel that is not topic text: count the row on the subscriptions of
        the topic its bytes spell, or on every one when they spell none."""
        channel = row["channel"]
        text: str | None = None
        if isinstance(channel, bytes) and len(channel) <= MAX_TOPIC_LENGTH:
            try:
                text = channel.decode()
            except UnicodeDecodeError:
                text = None
        subs = self._router.match(text) if text is not None else tuple(self._listeners)
        row_id = row["id"]
        detail = f"notification {row_id}: its channel is a {type(channel).__name__}, not topic text"
        for sub in subs:
            if row_id > sub.after_id:
                sub.count_malformed(detail, "envelope")

    def _unforeseen(self, row: dict[str, Any], exc: Exception) -> None:
        self.errors += 1
        if self.errors == 1:
            log.exception(
                "%s: handling notification %s raised %s; skipped (logged once, counted in "
                "Watcher.errors)",
                self._shared.path,
                row.get("id"),
                type(exc).__name__,
            )
