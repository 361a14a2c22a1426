"""Honker durable transport: a persistent event log in a SQLite file (honker streams).

Features
    persistent: yes   replay: yes (``start="earliest"`` or an offset)   ordered: yes
    consumer_offsets: yes   dead_letter: yes   wildcards: yes   cross_process: yes
    transactional_publish: yes (``store.transaction()`` ``tx.publish``)
    competing consumers: no: a second live subscription with the same consumer
    name, in this process or another, is refused with ``ConsumerBusy``.

    All topics share one honker stream (``_honker_stream.topic`` = the stream
    name); each row's payload is the event's JSON envelope (or, with
    ``format=cloudevents``, a structured CloudEvent) and its offset is
    ``event.offset``. Every row is parsed (``alkpubsub.storage.rows``): readers
    take our envelopes, CloudEvents and *foreign* rows (honker's own
    ``stream.publish``, the Node binding, any SQLite client). A foreign row has
    no topic of its own: it is the ``foreign_topic`` topic (default: the stream
    name), id ``uuid5(file, stream, offset)``, payload its JSON (else its text),
    header ``x-alk-foreign: json|text``, origin ``foreign``. A row that claims to
    be ours but is invalid, a BLOB, or non-UTF-8 text is counted in
    ``stats.malformed``; a named consumer whose pattern matches its topic (the
    one it names, else ``foreign_topic``) dead-letters it. Nothing stops a reader.
    A subscription reads rows after its position through honker's reader pool,
    skips topics its pattern does not match, and pauses while its buffer is
    full (backpressure, nothing dropped). Reads are woken by
    the database's shared watcher on every commit, from any process.

    A named ``consumer`` keeps its position in honker's ``_honker_stream_consumers``
    under the row name ``alkpubsub:<consumer>`` (so a honker-native consumer of
    the same name is another consumer: neither moves the other), as the highest
    offset below which every row of its topics was acked or dead-lettered (rows
    of other topics are skipped); it resumes after it: at least once. ``start``
    applies only to a consumer with no saved position; the position is saved
    when the name is first claimed. Without a consumer name a subscription
    starts at ``start`` and keeps no position. ``consumer_stats()`` lists both
    kinds (``ConsumerStat.kind`` = ``alkpubsub`` or ``honker``).

    ``nack(event, delay=, reason=)`` delivers the event again after ``delay``
    seconds; after ``max_deliveries`` deliveries it is appended to
    ``dead:<topic>`` (built by ``alkpubsub.deadletter``: ``x-dead-reason``,
    ``x-dead-kind``, ``x-deliveries``, ``x-consumer``, ``x-original-id``,
    ``x-original-topic``, ``x-original-offset``) and counts as acked. A dead
    letter that keeps failing is redelivered, never dead-lettered again; a
    wildcard pattern never sees dead letters (only patterns naming ``dead``
    first do). Delivery counts live in memory: a restart starts counting again.

    Redelivery window: acks are saved by the writer right after they happen (at
    most one save per consumer in flight, later acks coalesced into the next).
    After a crash, exactly the unacked events and the events acked after the
    last completed save are delivered again: in practice the last few
    milliseconds of acks. Closing a subscription saves its position first.

Connection String
    ``honker+durable:///abs/path/events.db?stream=events``
    ``honker+durable:///./events.db`` (relative to the working directory; also
    ``honker+durable://./events.db``). The file is created if missing.

Transport Options
    stream          events   honker stream holding the events; ``tx.publish(stream=)`` writes it
    max_deliveries  5        deliveries before an event goes to ``dead:<topic>``
                             (default from ``Settings.max_deliveries``)
    consumer_ttl    30       seconds a consumer name's lease lasts without renewal (the
                             longest a name stays taken after its holder crashed on
                             another host or container; a crashed local process frees it at once)
    read_batch      128      rows per read query
    notify_retention 60      seconds ``honker://`` notifications in the same file are
                             kept before this process's writer prunes them; 0 = never
                             (stream rows are pruned only by ``store.prune``)
    foreign         adopt    foreign rows: ``adopt`` (delivered as events, see above),
                             ``dead_letter`` (named consumers dead-letter them) or
                             ``drop`` (counted in ``stats.malformed``, skipped)
    foreign_topic   (stream) the topic of foreign rows; default the stream name if it
                             is a valid topic, else ``foreign``
    format          alkpubsub  what publishes write: ``alkpubsub`` (the envelope) or
                             ``cloudevents`` (structured CloudEvents JSON); readers take
                             both. ``cloudevents-binary`` is refused (rows have no headers)
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from pydantic import Field, field_validator

from alkpubsub.abilities import DEFAULT_MAX_DELIVERIES, ConsumerStat
from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.config import Settings, TransportOptions, parse_options, parse_url
from alkpubsub.deadletter import dead_letter, should_dead_letter
from alkpubsub.errors import ConfigError, ConnectionLost, ConsumerBusy, InvalidTopic
from alkpubsub.event import Event
from alkpubsub.storage import (
    DEFAULT_NOTIFY_RETENTION,
    DEFAULT_STREAM,
    ConsumerLease,
    ForeignMode,
    Malformed,
    RowDecoder,
    Store,
    Watcher,
    check_foreign_mode,
    check_stream_name,
    default_foreign_topic,
    parse_row,
)
from alkpubsub.topics import validate_topic
from alkpubsub.transport import BaseTransport, Subscription

from ._honker_common import Format, StoreHolder, check_format, database_path, encoder, place_offset

log = logging.getLogger("alkpubsub")


class HonkerDurableSubscription(Subscription):
    """Reads the stream from its own position; see the module docstring."""

    overflow = "pause"

    transport: HonkerDurableTransport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pos = 0  # every row up to here was read
        self._order: deque[int] = deque()  # unacked delivered offsets, oldest first
        self._acked: dict[int, bool] = {}  # offset -> acked, for those in _order
        self._deliveries: dict[int, int] = {}
        self._ready: deque[Event] = deque()  # nacked events due again
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._signal = asyncio.Event()
        self._lease: ConsumerLease | None = None
        self._saved = 0
        self._saving: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watcher: Watcher | None = None
        self._store: Store | None = None

    @property
    def position(self) -> int:
        """The highest offset below which everything was acked or skipped."""
        return self._order[0] - 1 if self._order else self._pos

    @property
    def saved_position(self) -> int:
        """The position last saved for a named consumer (0 without one)."""
        return self._saved

    # -- lifecycle ---------------------------------------------------------

    async def on_start(self) -> None:
        transport = self.transport
        store = self._store = await transport._holder.get()
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
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
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

    def wake(self) -> None:
        """Called by the watcher on every commit."""
        self._signal.set()

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
        transport = self.transport
        stream, batch = transport.stream, transport.read_batch
        foreign_topic, decode = transport.foreign_topic, transport.decoder.decode
        matches = self.pattern.matches
        track = self._lease is not None
        signal = self._signal
        while not self._closed:
            if self._ready:
                self.stats.redelivered += 1
                if not await self.put(self._ready.popleft()):
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
                event = decode(parsed, foreign_topic, offset, row["created_at"], row["key"])
                if isinstance(event, Malformed):
                    await self._malformed(offset, event)
                    self._pos = offset
                    continue
                self._pos = offset
                if not matches(event.topic):
                    continue
                place_offset(event, offset)
                if track:
                    self._order.append(offset)
                    self._acked[offset] = False
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
        transport = self.transport
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
        """Mark ``event`` processed; the position is saved shortly after."""
        await super().ack(event)
        if event.offset is not None:
            self._done(event.offset)

    async def nack(self, event: Event, *, delay: float = 0, reason: str | None = None) -> None:
        """Deliver ``event`` again after ``delay`` seconds, or dead-letter it (with
        ``reason``) once it has been delivered ``max_deliveries`` times."""
        await super().nack(event, delay=delay, reason=reason)
        offset = event.offset
        if offset is None or self._closed or offset in self._timers:
            return
        if self._lease is not None and self._acked.get(offset) is not False:
            return  # acked already, or not ours
        deliveries = self._deliveries.get(offset, 1)
        transport = self.transport
        if should_dead_letter(event.topic, deliveries, transport.max_deliveries):
            why = reason or f"nacked after {deliveries} deliveries"
            letter, body = dead_letter(
                topic=event.topic,
                reason=why,
                origin=transport.origin,
                event=event,
                deliveries=deliveries,
                consumer=self.consumer,
                offset=offset,
            )
            await transport.write_dead_letter(letter, body)
            self.stats.dead_lettered += 1
            self._done(offset)
            return
        self._deliveries[offset] = deliveries + 1
        if delay > 0:
            loop = asyncio.get_running_loop()
            self._timers[offset] = loop.call_later(delay, self._due, event)
        else:
            self._due(event)

    def _due(self, event: Event) -> None:
        if event.offset is not None:
            self._timers.pop(event.offset, None)
        if not self._closed:
            self._ready.append(event)
            self._signal.set()

    def _done(self, offset: int) -> None:
        self._deliveries.pop(offset, None)
        if self._lease is None or self._acked.get(offset) is not False:
            return
        self._acked[offset] = True
        order, acked = self._order, self._acked
        while order and acked[order[0]]:
            del acked[order.popleft()]
        if self.position > self._saved and self._saving is None and not self._closed:
            self._saving = asyncio.get_running_loop().create_task(self._save())

    async def _save(self) -> None:
        try:
            while self._lease is not None and (target := self.position) > self._saved:
                await self._lease.save(target)
                self._saved = target
        except Exception as exc:
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


class HonkerDurableTransport(BaseTransport):
    """Durable, replayable publish/subscribe in a Honker (SQLite) stream."""

    capabilities = Capabilities(
        persistent=True,
        replay=True,
        consumer_offsets=True,
        ordered=True,
        cross_process=True,
        transactional_publish=True,
        wildcards=True,
        dead_letter=True,
    )

    def __init__(
        self,
        path: str,
        *,
        stream: str = DEFAULT_STREAM,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        consumer_ttl: int = 30,
        read_batch: int = 128,
        origin: str | None = None,
        notify_retention: float = DEFAULT_NOTIFY_RETENTION,
        foreign: ForeignMode = "adopt",
        foreign_topic: str | None = None,
        format: Format = "alkpubsub",
    ) -> None:
        super().__init__(origin=origin)
        self.stream = check_stream_name(stream)
        self._max_deliveries = max_deliveries
        self.consumer_ttl = consumer_ttl
        self.read_batch = read_batch
        self.foreign = check_foreign_mode(foreign)
        self.foreign_topic = _check_foreign_topic(foreign_topic, self.stream)
        self.format = check_format(format)
        self._encode = encoder(self.format)
        where = f"//{path}" if path.startswith("/") else f"///{path}"
        self.name = f"honker+durable:{where}?stream={stream}"
        self._holder = StoreHolder(path, self.origin, notify_retention)
        location = f"honker+durable:{StoreHolder.resolved(path)}?stream={self.stream}"
        self.decoder = RowDecoder(location, self.foreign, same_topic=False)
        """Reads rows into events (``alkpubsub.storage.rows``)."""

    @property
    def max_deliveries(self) -> int:
        """Deliveries before an event goes to ``dead:<topic>`` (DeadLetterPolicy)."""
        return self._max_deliveries

    async def connect(self) -> None:
        """Open the database file (shared with every transport on it in this process)."""
        self.check_open()
        await self._holder.get()

    @property
    def store(self) -> Store:
        """The storage handle on this file: ``tx.publish`` in ``transport.store.transaction()``
        writes this stream with this transport's origin."""
        return self._holder.store or self._holder.open_now()

    async def send(self, event: Event, body: bytes) -> Event:
        store = self._holder.store or await self._holder.get()
        [offset] = await store.append(self.stream, [(event.key, self._encode(event, body))])
        return event.with_offset(offset)

    async def send_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        store = self._holder.store or await self._holder.get()
        encode = self._encode
        rows = [(event.key, encode(event, body)) for event, body in batch]
        offsets = await store.append(self.stream, rows)
        return [event.with_offset(o) for (event, _), o in zip(batch, offsets, strict=True)]

    async def write_dead_letter(self, letter: Event, body: bytes) -> Event:
        """Append a dead letter built by ``alkpubsub.deadletter`` to the stream."""
        store = self._holder.store or await self._holder.get()
        [offset] = await store.append(self.stream, [(letter.key, self._encode(letter, body))])
        return letter.with_offset(offset)

    def make_subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        return HonkerDurableSubscription(
            self, pattern, consumer=consumer, start=start, buffer=buffer
        )

    async def consumer_stats(self) -> list[ConsumerStat]:
        """Each durable consumer of this stream, alkpubsub's and honker's own
        (``kind``): saved offset and lag (rows behind the newest event, other
        topics included). Used by ``alkpubsub stats``."""
        store = self._holder.store or await self._holder.get()
        consumers, head = await asyncio.to_thread(
            lambda: (store.consumers(self.stream), store.stream_head(self.stream))
        )
        return [
            ConsumerStat(c.name, c.offset, max(head - c.offset, 0), kind=c.kind) for c in consumers
        ]

    async def disconnect(self) -> None:
        self._holder.close()


def _check_foreign_topic(topic: str | None, stream: str) -> str:
    if topic is None:
        return default_foreign_topic(stream)
    try:
        return validate_topic(topic)
    except InvalidTopic as exc:
        raise ConfigError(f"foreign_topic={topic[:60]!r} is not a topic: {exc}") from None


class _Options(TransportOptions):
    stream: str = DEFAULT_STREAM
    max_deliveries: int = Field(DEFAULT_MAX_DELIVERIES, ge=1)
    consumer_ttl: int = Field(30, ge=3)
    read_batch: int = Field(128, ge=1, le=10_000)
    notify_retention: float = Field(DEFAULT_NOTIFY_RETENTION, ge=0)
    foreign: str = "adopt"
    foreign_topic: str | None = None
    format: str = "alkpubsub"

    @field_validator("stream")
    @classmethod
    def _stream(cls, value: str) -> str:
        return check_stream_name(value)

    @field_validator("foreign")
    @classmethod
    def _foreign(cls, value: str) -> str:
        return check_foreign_mode(value)

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        return check_format(value)


def from_url(url: str, settings: Settings | None = None) -> HonkerDurableTransport:
    """Build a transport from ``honker+durable:///path/events.db?stream=events``."""
    parsed = parse_url(url)
    extra: dict[str, Any] = {}
    given = parsed.query.keys() | (settings.options.keys() if settings else set())
    if settings is not None and "max_deliveries" not in given:
        extra["max_deliveries"] = settings.max_deliveries
    options = parse_options(_Options, parsed, settings, **extra)
    return HonkerDurableTransport(
        database_path(parsed),
        stream=options.stream,
        max_deliveries=options.max_deliveries,
        consumer_ttl=options.consumer_ttl,
        read_batch=options.read_batch,
        origin=settings.origin if settings else None,
        notify_retention=options.notify_retention,
        foreign=check_foreign_mode(options.foreign),
        foreign_topic=options.foreign_topic,
        format=check_format(options.format),
    )
