"""A subscription of the Redis Streams transport: one consumer-group member.

Three tasks per subscription: the *reader* feeds new entries into the bounded
buffer (``XREADGROUP``; a full buffer pauses it), the *claimer* takes over due
entries (nacked ones, and those of members that crashed) and the *keeper*
flushes batched acks, makes nacked entries claimable when due and keeps the
entries this member holds from being claimed by others. The Redis commands
behind each step are in ``_redis_group.py``; the design in
``docs/decisions/004-redis-channels-and-streams.md``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from redis import exceptions as rex

from alkpubsub.deadletter import dead_letter, should_dead_letter
from alkpubsub.errors import ConnectionLost, PayloadError
from alkpubsub.event import Event
from alkpubsub.topics import is_dead_letter
from alkpubsub.transport import Subscription

from ._redis_common import (
    CONNECTION_ERRORS,
    Backoff,
    id_to_offset,
    offset_to_id,
    start_id,
    stop_tasks,
    translate,
)
from ._redis_decode import entry_topic, read_entry
from ._redis_group import GroupMember

if TYPE_CHECKING:
    from .redis_durable import RedisDurableTransport

log = logging.getLogger("alkpubsub.redis")

BLOCK_MS = 5000  # one XREADGROUP waits this long for new entries


@dataclass(slots=True)
class _Held:
    """An entry this member owns: its id, deliveries so far, handed to the app?"""

    entry_id: bytes
    deliveries: int
    delivered: bool = False


class RedisStreamSubscription(Subscription):
    """One member of a consumer group on the transport's stream. Three tasks:
    the reader (new entries), the claimer (due entries: nacked or a crashed
    member's) and the keeper (flushes acks, schedules nacks, keeps held entries)."""

    transport: RedisDurableTransport
    overflow = "pause"

    def __init__(self, transport: RedisDurableTransport, pattern: str, **kw: Any) -> None:
        super().__init__(transport, pattern, **kw)
        t = transport
        self.group = GroupMember(
            t._io,
            t.stream,
            self.consumer or f"alk.anon-{uuid4().hex}",
            f"{self.consumer or 'anon'}-{uuid4().hex[:12]}",
            claim_ms=t._claim_ms,
            batch=t.options.batch,
            trim=t._trim,
        )
        self._held: dict[int, _Held] = {}  # by offset
        self._deferred: dict[int, tuple[_Held, float]] = {}  # nacked: due (loop time)
        self._nacked: dict[bytes, float] = {}  # nacked, claimable when due (loop time)
        self._acks: list[bytes] = []
        self._reasons: dict[bytes, str] = {}  # the last nack's reason, by entry id
        self._keep_wake = asyncio.Event()
        self._claim_wake = asyncio.Event()
        # Set after the claimer's first pass: entries parked by a member that
        # closed (or died) precede anything newer, so the reader waits for it.
        self._first_claim = asyncio.Event()
        self._put_lock = asyncio.Lock()  # the reader and the claimer both fill the buffer
        # Each task paces its own retries; only the reader's recoveries count
        # as reconnects (it always has a call in flight, so it sees every outage).
        limit = t.options.reconnect_timeout
        self._backoff = {r: Backoff(limit) for r in ("reader", "claimer", "keeper", "dead")}
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------

    async def on_start(self) -> None:
        try:
            await self.group.join(start_id(self.start_at))
        except CONNECTION_ERRORS as exc:
            raise translate(exc, self.transport.target, "joining the consumer group") from None
        name = f"alkpubsub {self.group.stream}/{self.group.member}"
        for job, what in ((self._read, "reader"), (self._claim, "claimer"), (self._keep, "keeper")):
            task = asyncio.create_task(job(), name=f"{name} {what}")
            task.add_done_callback(self._task_done)
            self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("%s: %s failed", self.transport.name, task.get_name(), exc_info=error)
        self.fail(error)  # type: ignore[arg-type]
        self._end()

    def _end(self) -> None:
        """Stop delivering after a failure: the iterator ends after raising it."""
        self.finish()
        self.transport.forget(self)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def on_close(self) -> None:
        self._claim_wake.set()
        self._keep_wake.set()
        await stop_tasks(self._tasks)
        try:
            async with asyncio.timeout(self.transport.options.connect_timeout):
                await self._flush_acks()
                if self.consumer is None:
                    await self.group.destroy()
                    return
                now = asyncio.get_running_loop().time()
                dues = {h.entry_id: due for h, due in self._deferred.values()} | self._nacked
                due_ms = {eid: int(max(0.0, due - now) * 1000) for eid, due in dues.items()}
                seen = {h.entry_id for h in self._held.values() if h.delivered}
                await self.group.hand_back(seen, due_ms)
                await self.group.leave()
        except (rex.ResponseError, *CONNECTION_ERRORS) as exc:
            log.warning(
                "%s: could not hand back %s's entries on close (%s); "
                "they are claimed after claim_idle",
                self.transport.name,
                self.group.member,
                exc,
            )

    def _gone(self, role: str, error: BaseException) -> bool:
        """Record a failed call; after ``reconnect_timeout`` fail the subscription."""
        backoff = self._backoff[role]
        if not backoff.down and role == "reader":
            log.warning("%s: connection lost (%s); retrying", self.transport.name, error)
        if backoff.failed():
            return True
        self.fail(
            ConnectionLost(
                f"{self.transport.name} was unreachable for more than "
                f"{self.transport.options.reconnect_timeout:g} s; subscribe again later"
            )
        )
        self._end()
        return False

    def _ok(self, role: str) -> None:
        backoff = self._backoff[role]
        since = backoff.since
        if backoff.recovered() and role == "reader" and since is not None:
            gap = time.monotonic() - since
            self.stats.reconnects += 1
            self.stats.offline_ms += round(gap * 1000)
            log.warning(
                "%s: %s reconnected after %.3f s", self.transport.name, self.group.member, gap
            )

    # -- delivering --------------------------------------------------------

    async def _read(self) -> None:
        count = min(self.transport.options.batch, self.buffer_size)
        await self._first_claim.wait()
        while True:
            try:
                entries = await self.group.read(count, BLOCK_MS)
            except rex.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.group.rejoin()
                continue
            except CONNECTION_ERRORS as exc:
                if not self._gone("reader", exc):
                    return
                await self._backoff["reader"].pause()
                continue
            self._ok("reader")
            for entry in entries:
                if not await self._accept(*entry):
                    return

    async def _accept(self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> bool:
        """Deliver one entry (or skip, or dead-letter it); False once closed."""
        t = self.transport
        offset = id_to_offset(entry_id)
        if offset in self._held:
            return True  # already ours (claimed back while still buffered)
        topic = entry_topic(fields, t.stream_topic)
        if topic is not None and not self.pattern.matches(topic):
            # Not for this group (dead letters included, unless the pattern
            # names ``dead`` first): skip it for good, silently, unparsed.
            return self._skip(entry_id)
        entry = read_entry(fields, topic=topic, entry_id=entry_id, offset=offset, stream=t.stream)
        held = _Held(entry_id, deliveries)
        if entry.decoded is None:
            where = f"on {topic!r}" if topic else "with no valid topic"
            t.report_malformed(self, "entry", f"entry {entry_id!r} {where}: {entry.error}")
            if self.consumer is None or self.pattern.sees_dead:
                # No consumer to dead-letter for; and a dead-letter reader never
                # writes dead letters (no chains).
                return self._skip(entry_id)
            reason = f"malformed: {entry.error}"
            return await self._bury(held, topic or "", reason, raw=entry.raw)
        event = entry.decoded.event
        assert topic is not None
        if entry.decoded.foreign and t.options.foreign != "adopt":
            if (
                t.options.foreign == "dead_letter"
                and self.consumer is not None
                and not is_dead_letter(topic)  # no chains: then it is dropped
            ):
                return await self._bury(held, topic, "foreign message (foreign=dead_letter)", event)
            t.report_malformed(self, "foreign", f"entry {entry_id!r} on {topic!r} is foreign")
            return self._skip(entry_id)
        self._nacked.pop(entry_id, None)
        if should_dead_letter(topic, deliveries - 1, t.max_deliveries):
            failed = deliveries - 1
            reason = self._reasons.pop(entry_id, "") or f"not acked in {failed} deliveries"
            return await self._bury(held, topic, reason, event, deliveries=deliveries - 1)
        if deliveries > 1:
            self.stats.redelivered += 1
        self._held[offset] = held
        async with self._put_lock:
            return await self.put(event)

    def _skip(self, entry_id: bytes) -> bool:
        self._acks.append(entry_id)
        self._keep_wake.set()
        return True

    async def _bury(
        self,
        held: _Held,
        topic: str,
        reason: str,
        event: Event | None = None,
        *,
        raw: bytes | None = None,
        deliveries: int | None = None,
    ) -> bool:
        """Dead-letter the entry to ``dead:<topic>`` (and ack it); False once failed."""
        t = self.transport
        common: dict[str, Any] = {
            "topic": topic,
            "origin": t.origin,
            "deliveries": held.deliveries if deliveries is None else deliveries,
            "consumer": self.consumer,
            "offset": id_to_offset(held.entry_id),
        }
        try:
            dead, body = dead_letter(reason=reason, event=event, raw=raw, **common)
        except PayloadError as exc:
            # Not publishable as it is (written around the publish checks):
            # keep the reason and the text, not the payload.
            text = event.model_dump_json() if event is not None else raw
            why = f"{reason}; payload not kept: {exc}"
            dead, body = dead_letter(reason=why, raw=text, **common)
            if event is not None:
                dead = dead.with_headers(**{"x-original-id": event.id})
        self._reasons.pop(held.entry_id, None)
        while True:
            try:
                await self.group.bury(held.entry_id, t.entry_fields(dead, body))
            except CONNECTION_ERRORS as exc:
                if not self._gone("dead", exc):
                    return False
                await self._backoff["dead"].pause()
                continue
            self._ok("dead")
            self.stats.dead_lettered += 1
            return True

    async def __anext__(self) -> Event:
        event = await super().__anext__()
        held = self._held.get(event.offset or 0)
        if held is not None:
            held.delivered = True
        return event

    # -- acknowledgement ---------------------------------------------------

    async def ack(self, event: Event) -> None:
        """Mark ``event`` processed; the XACK goes out with others right away."""
        await super().ack(event)
        held = self._held.pop(event.offset or 0, None)
        entry_id = held.entry_id if held else offset_to_id(event.offset or 0).encode()
        self._reasons.pop(entry_id, None)
        self._acks.append(entry_id)
        if not self.closed:
            self._keep_wake.set()
            return
        try:
            await self._flush_acks()
        except CONNECTION_ERRORS as exc:
            raise translate(exc, self.transport.target, "acking") from None

    async def nack(self, event: Event, *, delay: float = 0, reason: str | None = None) -> None:
        """Hand ``event`` back for redelivery (to any member) after ``delay`` s.
        On its last allowed delivery it is dead-lettered instead, with ``reason``
        as ``x-dead-reason``; a dead letter is always redelivered."""
        await super().nack(event, delay=delay, reason=reason)
        held = self._held.pop(event.offset or 0, None)
        if held is None:
            return
        limit = self.transport.max_deliveries
        why = reason or f"nacked on delivery {held.deliveries} of {limit}"
        if should_dead_letter(event.topic, held.deliveries, limit):
            # The last allowed delivery failed: bury it now rather than after a redelivery.
            await self._bury(held, event.topic, why, event)
            return
        if reason is not None:
            self._reasons[held.entry_id] = reason  # if it is claimed once too often
        due = asyncio.get_running_loop().time() + max(0.0, delay)
        self._deferred[event.offset or 0] = (held, due)
        self._keep_wake.set()

    async def _flush_acks(self) -> None:
        ids, self._acks = self._acks, []
        try:
            await self.group.ack(ids)
        except BaseException:
            self._acks[:0] = ids
            raise

    # -- keeping and claiming ----------------------------------------------

    async def _keep(self) -> None:
        """Flush acks, schedule nacked entries, keep what this member holds."""
        claim_idle = self.transport.options.claim_idle
        loop = asyncio.get_running_loop()
        next_keep = loop.time() + claim_idle / 3
        while True:
            dues = [due - claim_idle for _, due in self._deferred.values()]
            try:
                async with asyncio.timeout(max(0.0, min([next_keep, *dues]) - loop.time())):
                    await self._keep_wake.wait()
            except TimeoutError:
                pass
            self._keep_wake.clear()
            if self.closed:
                return
            try:
                await self._flush_acks()
                await self._schedule_nacked(loop.time())
                if loop.time() >= next_keep:
                    held = [h.entry_id for h in self._held.values()]
                    await self.group.keep(held + [h.entry_id for h, _ in self._deferred.values()])
                    lag = await self.group.lag()
                    self.stats.lag = None if lag is None else lag + self.buffered
                    next_keep = loop.time() + claim_idle / 3
            except CONNECTION_ERRORS as exc:
                if not self._gone("keeper", exc):
                    return
                await self._backoff["keeper"].pause()
                self._keep_wake.set()
                continue
            self._ok("keeper")

    async def _schedule_nacked(self, now: float) -> None:
        """Nacked entries due within ``claim_idle``: make them claimable when due
        and wake the claimer then. Later ones stay held (and kept) meanwhile."""
        loop = asyncio.get_running_loop()
        for offset, (held, due) in list(self._deferred.items()):
            wait = max(0.0, due - now)
            if wait > self.transport.options.claim_idle:
                continue
            await self.group.release_after(held.entry_id, int(wait * 1000))
            del self._deferred[offset]
            self._nacked[held.entry_id] = due
            loop.call_later(wait, self._claim_wake.set)

    async def _claim(self) -> None:
        """Take over due entries: nacked ones, and those of crashed members."""
        try:
            await self._claim_loop()
        finally:
            self._first_claim.set()

    async def _claim_loop(self) -> None:
        cursor: bytes | str = "0-0"
        while True:
            try:
                for _ in range(10):  # bounded work per pass; the cursor carries on
                    cursor, entries = await self.group.claim(cursor)
                    for entry in entries:
                        if not await self._accept(*entry):
                            return
                    if cursor in (b"0-0", "0-0"):
                        break
            except rex.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.group.rejoin()
            except CONNECTION_ERRORS as exc:
                if not self._gone("claimer", exc):
                    return
                await self._backoff["claimer"].pause()
                continue
            self._ok("claimer")
            self._first_claim.set()
            try:
                async with asyncio.timeout(self.transport._claim_every):
                    await self._claim_wake.wait()
            except TimeoutError:
                pass
            self._claim_wake.clear()
            if self.closed:
                return
