"""One wake-up watcher per Honker database and event loop.

honker's ``update_events()`` yields once per commit seen on the file (any
process). The watcher owns the only such iterator for its database in this
event loop. On each wake it runs ONE query for new notifications and fans the
rows out in memory through a :class:`Router`, so the cost of a commit does not
grow with the number of subscribed topics; then it wakes every durable stream
reader, which reads from its own position. Commits made by this process also
poke it directly, so local subscribers need not wait for honker's 1 ms poll.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from alkpubsub.errors import ConnectionLost, PayloadError
from alkpubsub.event import Event
from alkpubsub.routing import Router
from alkpubsub.topics import Pattern

if TYPE_CHECKING:
    from .store import SharedDatabase

log = logging.getLogger("alkpubsub.storage")

READ_BATCH = 256
"""Notification rows per query; the watcher yields to the loop between batches."""
FALLBACK_POLL = 5.0
"""Seconds after which the watcher reads even without a wake (a missed wake costs at most this)."""
MAX_DEFERRED = 32
"""Wakes in a row the watcher may skip because this loop has a commit queued
for its next turn (that commit wakes it again, so one read serves both)."""
MAX_DEFER_AGE = 0.001
"""Seconds after the first skipped wake by which the watcher reads regardless."""

SELECT_NOTIFICATIONS = (
    "SELECT id, channel, payload FROM _honker_notifications WHERE id > ? ORDER BY id LIMIT ?"
)
MAX_NOTIFICATION_ID = "SELECT COALESCE(MAX(id), 0) AS m FROM _honker_notifications"


class Listener(Protocol):
    """A live subscription to notifications (the ``honker://`` transport's)."""

    after_id: int
    """Deliver only rows with a larger id (set when it is added)."""

    @property
    def pattern(self) -> Pattern: ...

    def _push(self, event: Event) -> None: ...

    def _malformed(self, detail: str) -> None: ...

    def _fail(self, error: BaseException) -> None: ...


class Reader(Protocol):
    """A durable stream reader (the ``honker+durable://`` transport's)."""

    def wake(self) -> None: ...

    def _fail(self, error: BaseException) -> None: ...


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
        self.wakes = 0
        """Wake-ups processed (for tests and stats)."""

    def start(self) -> None:
        # Subscribe to wake-ups before anything reads, so a commit that lands
        # between a snapshot and the first wait still wakes us.
        updates = self._db.update_events()
        self._tasks = [
            self.loop.create_task(self._pump(updates), name="alkpubsub-honker-pump"),
            self.loop.create_task(self._run(), name="alkpubsub-honker-watcher"),
        ]
        self._fallback = self.loop.call_later(FALLBACK_POLL, self._fallback_tick)

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self._fallback is not None:
            self._fallback.cancel()
            self._fallback = None

    def _fallback_tick(self) -> None:
        # One timer for the watcher's life, not one per wait: arming and
        # cancelling a timeout on every wake cost more than the wake itself.
        self._signal.set()
        self._fallback = self.loop.call_later(FALLBACK_POLL, self._fallback_tick)

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
        return int(self._db.query(MAX_NOTIFICATION_ID)[0]["m"])

    # -- the loop ----------------------------------------------------------

    async def _pump(self, updates: Any) -> None:
        try:
            while True:
                await updates.__anext__()
                self._signal.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # honker's watcher died: the file was replaced or closed
            self._die(exc)

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
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._die(exc)
                return
            for reader in list(self._readers):
                reader.wake()

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
            subs = match(row["channel"])
            if not subs:
                continue
            row_id = row["id"]
            event: Event | None = None
            for sub in subs:
                if row_id <= sub.after_id:
                    continue
                if event is None:
                    try:
                        event = Event.from_json(row["payload"])
                    except PayloadError as exc:
                        for bad in subs:
                            bad._malformed(f"notification {row_id}: {exc}")
                        break
                sub._push(event)

    def _die(self, exc: BaseException) -> None:
        error = ConnectionLost(
            f"the wake-up watcher of {self._shared.path!r} stopped ({exc}); if the database "
            "file was replaced or closed, open the transport again"
        )
        log.error("%s", error)
        for listener in list(self._listeners):
            listener._fail(error)
        for reader in list(self._readers):
            reader._fail(error)
