"""The subscription of ``honker+durable://`` (see that module's docstring): reads
the stream from its own position, delivers with backpressure, tracks acks,
saves a named consumer's position and dead-letters through ``alkpubsub.deadletter``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol, runtime_checkable

from alkpubsub.deadletter import dead_letter
from alkpubsub.errors import ConnectionLost, ConsumerBusy
from alkpubsub.event import Event
from alkpubsub.storage import ConsumerLease, Malformed, RowDecoder, Store, Watcher, parse_row
from alkpubsub.transport import BaseTransport, Subscription

from ._honker_common import place_offset
from ._redelivery import AckLedger, bury

log = logging.getLogger("alkpubsub")


@runtime_checkable
class DurableLog(Protocol):
    """What the subscription needs from its transport (``HonkerDurableTransport``)."""

    stream: str
    read_batch: int
    ack_mode: str
    consumer_ttl: int
    foreign: str
    foreign_topic: str
    decoder: RowDecoder
    origin: str

    @property
    def max_deliveries(self) -> int: ...

    async def open_store(self) -> Store: ...

    async def write_dead_letter(self, letter: Event, body: bytes) -> Event: ...

    def report_malformed(self, sub: Subscription | None, kind: str, detail: str) -> None: ...


class HonkerDurableSubscription(Subscription):
    """Reads the stream from its own position; see the module docstring."""

    overflow = "pause"

    def __init__(self, transport: BaseTransport, *args: Any, **kwargs: Any) -> None:
        super().__init__(transport, *args, **kwargs)
        if not isinstance(transport, DurableLog):
            raise TypeError(f"{transport!r} is not a durable Honker transport")
        self.log: DurableLog = transport
        """The transport, as the log this subscription reads."""
        self._pos = 0  # every row up to here was read
        self._signal = asyncio.Event()
        self._ledger = AckLedger(self._signal.set)
        self._own_skipped = False
        self._lease: ConsumerLease | None = None
        self._saved = 0
        self._saving: asyncio.Task[None] | None = None
        self._save_error: Exception | None = None
        self._released = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._watcher: Watcher | None = None
        self._store: Store | None = None

    @property
    def position(self) -> int:
        """The highest offset below which everything was acked or skipped."""
        return self._ledger.position(self._pos)

    @property
    def saved_position(self) -> int:
        """The position last saved for a named consumer (0 without one)."""
        return self._saved

    # -- lifecycle ---------------------------------------------------------

    async def on_start(self) -> None:
        transport = self.log
        store = self._store = await transport.open_store()
        if self.consumer is not None:
            lease = store.consumer_lease(transport.stream, self.consumer, transport.consumer_ttl)
            self._pos = self._saved = await lease.claim(self.start_at)
            self._lease = lease
        else:
            self._pos = store.start_position(transport.stream, self.start_at)
        try:
            self._watcher = store.watcher()
        except BaseException:
            if self._lease is not None:
                await self._lease.release(self._pos)
            raise
        self._watcher.add_reader(self)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._read_loop(), name=f"alkpubsub-read:{self}"))
        if self._lease is not None:
            self._tasks.append(loop.create_task(self._keep_lease(), name=f"alkpubsub-lease:{self}"))

    async def on_close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._ledger.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._watcher is not None:
            self._watcher.remove_reader(self)
            self._watcher = None
        lease, self._lease = self._lease, None
        if lease is not None:
            if self._saving is not None:
                await asyncio.gather(self._saving, return_exceptions=True)
            try:
                await lease.release(self.position)
                self._saved = max(self._saved, self.position)
            except Exception as exc:
                log.warning("%s: could not save position on close: %s", self, exc)
            finally:
                self._released.set()

    def wake(self, local: bool = False) -> None:
        """Called by the watcher on every commit (``local``: only this process's)."""
        skipped, self._own_skipped = self._own_skipped, False
        if local and skipped:
            return  # that commit's rows of ours were passed by skip_own()
        self._signal.set()

    def skip_own(self, first: int, last: int) -> None:
        """Offsets ``first..last`` hold this subscriber's own events, delivered to
        it already (a composite's echoes): when nothing unread comes before
        them, move past them without reading them, and let the local wake of
        their commit go. Rows another job of the same commit wrote after them
        are read at the next wake (honker's own, within a few milliseconds)."""
        if self._pos == first - 1 and not self._ledger.ready:
            self._pos = last
            self._own_skipped = True

    # -- reading -----------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            await self._read()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("%s: reader stopped: %s", self, exc)
            self.fail(ConnectionLost(f"{self!r} stopped reading: {exc}"))

    async def _read(self) -> None:
        assert self._store is not None
        rows_after = self._store.rows_after
        transport = self.log
        stream, batch = transport.stream, transport.read_batch
        foreign_topic, decode = transport.foreign_topic, transport.decoder.decode
        matches = self.pattern.matches
        track = self._lease is not None
        signal = self._signal
        skip = self.skip_origin
        ledger = self._ledger
        ready = ledger.ready
        while not self._closed:
            if ready:
                self.stats.redelivered += 1
                if not await self.put(ready.popleft()):
                    return
                continue
            signal.clear()
            limit = max(1, min(batch, self.buffer_size - len(self._buffer)))
            rows = rows_after(stream, self._pos, limit)
            self.stats.lag = len(self._buffer) if len(rows) < limit else None
            if not rows:
                await signal.wait()
                continue
            for row in rows:
                offset: int = row["offset"]
                # Parsed, never sniffed: ~3 us for a 400-byte envelope of a topic
                # this pattern skips (docs/decisions/003).
                parsed = parse_row(row["payload"], foreign_topic)
                if parsed.kind != "bad" and not matches(parsed.topic or foreign_topic):
                    self._pos = offset  # another topic's row: not ours to deliver
                    continue
                if (
                    skip is not None
                    and parsed.kind == "ours"
                    and parsed.value.get("origin") == skip
                    and parsed.value.get("id") not in self.keep_ids
                ):
                    self._pos = offset  # an echo the subscriber does not want
                    continue
                event = decode(parsed, foreign_topic, offset, row["created_at"], row["key"])
                if isinstance(event, Malformed):
                    await self._malformed(offset, event)
                    self._pos = offset
                    continue
                self._pos = offset
                if parsed.kind != "ours" and not matches(event.topic):
                    continue  # (our envelope's topic is the one matched above)
                place_offset(event, offset)
                if track:
                    ledger.delivered(offset)
                if not await self.put(event):
                    return
            if len(rows) < limit:
                # That was everything committed before the query; a later commit
                # set the signal (cleared before the query), so wait for it rather
                # than run a query that would most likely find nothing.
                await signal.wait()
            else:
                await asyncio.sleep(0)  # let others run between batches

    async def _malformed(self, offset: int, row: Malformed) -> None:
        """Count a row that is no event; a named consumer whose pattern matches the
        topic it is filed under also dead-letters it. If that write fails, the
        reader stops before the row (its position never passes it)."""
        transport = self.log
        detail = f"{transport.stream!r} offset {offset}: {row.detail}"
        transport.report_malformed(self, row.kind, detail)
        topic = row.topic
        if topic is None or not self.pattern.matches(topic) or self._lease is None:
            return  # not this consumer's topic, or no consumer to own it
        if row.kind == "foreign" and transport.foreign == "drop":
            return
        letter, body = dead_letter(
            topic=topic,
            reason=row.detail,
            origin=transport.origin,
            raw=row.raw,
            consumer=self.consumer,
            offset=offset,
        )
        await transport.write_dead_letter(letter, body)
        self.stats.dead_lettered += 1

    # -- acknowledgement ---------------------------------------------------

    async def ack(self, event: Event) -> None:
        """Mark ``event`` processed; the position is saved shortly after. With
        ``ack=saved`` this returns only once the saved position covers every
        event acked so far that it can: all of them when acks come in order; an
        event acked ahead of an earlier unacked one is covered once that one is."""
        await super().ack(event)
        if event.offset is not None:
            self._done(event.offset)
            if self.log.ack_mode == "saved" and self._lease is not None:
                await self._saved_through(self.position)

    async def _saved_through(self, target: int) -> None:
        """Wait until the saved position reaches ``target`` (one save serves every
        ack waiting for it; saves go through the writer's group commit)."""
        while self._saved < target and self._lease is not None:
            saving = self._saving
            if saving is None:
                saving = self._saving = asyncio.get_running_loop().create_task(self._save())
            before = self._saved
            await asyncio.shield(saving)
            if self._saved == before and self._save_error is not None:
                raise ConnectionLost(
                    f"{self!r}: the ack could not be saved ({self._save_error}); the event "
                    "will be delivered again"
                )
        if self._saved < target:
            # Closing took the lease: its release saves the position; wait for it.
            await self._released.wait()
            if self._saved < target:
                raise ConnectionLost(
                    f"{self!r} closed before the ack could be saved; the event will be "
                    "delivered again"
                )

    async def nack(self, event: Event, *, delay: float = 0, reason: str | None = None) -> None:
        """Deliver ``event`` again after ``delay`` seconds, or dead-letter it (with
        ``reason``) once it has been delivered ``max_deliveries`` times."""
        await super().nack(event, delay=delay, reason=reason)
        offset = event.offset
        if offset is None or self._closed:
            return
        ledger = self._ledger
        if self._lease is not None and not ledger.unacked(offset):
            return  # acked already, or not ours
        transport = self.log
        deliveries = ledger.retry(event, offset, delay, transport.max_deliveries)
        if deliveries is not None:
            await bury(
                event,
                offset,
                deliveries=deliveries,
                reason=reason,
                origin=transport.origin,
                consumer=self.consumer,
                write=transport.write_dead_letter,
            )
            self.stats.dead_lettered += 1
            self._done(offset)

    def _done(self, offset: int) -> None:
        if not self._ledger.settle(offset) or self._lease is None:
            return
        if self.position > self._saved and self._saving is None and not self._closed:
            self._saving = asyncio.get_running_loop().create_task(self._save())

    async def _save(self) -> None:
        self._save_error = None
        try:
            while self._lease is not None and (target := self.position) > self._saved:
                await self._lease.save(target)
                self._saved = target
        except Exception as exc:
            self._save_error = exc
            log.warning("%s: could not save position (retried on the next ack): %s", self, exc)
        finally:
            self._saving = None

    async def _keep_lease(self) -> None:
        lease = self._lease
        assert lease is not None
        while True:
            await asyncio.sleep(lease.ttl / 3)
            try:
                held = await lease.renew()
            except Exception as exc:
                log.warning("%s: could not renew the consumer lease: %s", self, exc)
                continue
            if not held:
                self.fail(
                    ConsumerBusy(
                        f"consumer {self.consumer!r} lost its lease (not renewed within "
                        f"{lease.ttl} s, and another subscription took the name); subscribe again"
                    )
                )
                return
            if self.position > self._saved and self._saving is None:
                # Rows skipped by the pattern move the position without any ack.
                self._saving = asyncio.get_running_loop().create_task(self._save())
