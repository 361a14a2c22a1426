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

    Redelivery window: with the default ``ack=batched``, acks are saved by the
    writer right after they happen (at most one save per consumer in flight,
    later acks coalesced into the next). After a crash, exactly the unacked
    events and the events acked after the last completed save are delivered
    again: measured by tests/reliability/test_ack_modes.py (a consumer acking
    each of 10,000 events, SIGKILLed three times), 250-360 events per kill, the
    last tens of milliseconds of acks. With ``ack=saved``, ``await
    sub.ack(event)`` returns only once the saved position covers the event (the
    saves of many acks and subscriptions share the writer's commits): the same
    test finds 0 acked events delivered again, at about half the throughput of
    a consumer that awaits each event (``make bench``, honker rows). An event
    acked ahead of an earlier unacked one is covered once that one is acked or
    dead-lettered. Closing a subscription saves its position first.

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
    ack             batched  ``batched``: ``ack()`` returns at once and the position is saved
                             right after (see "Redelivery window"); ``saved``: ``await
                             sub.ack(event)`` returns only once the position covering the
                             event is committed (acks of many subscriptions share commits)
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
    tenant          (none)   the path is a deployment root and the file is this tenant's:
                             ``tenant-<id>.db`` (``system``: ``system.db``), as ``Stores`` lays
                             them out; an id that is not a safe file-name segment is refused
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import Field, field_validator

from alkpubsub.abilities import DEFAULT_MAX_DELIVERIES, ConsumerStat
from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.config import Settings, TransportOptions, parse_options, parse_url
from alkpubsub.errors import ConfigError, InvalidTopic
from alkpubsub.event import Event
from alkpubsub.storage import (
    DEFAULT_NOTIFY_RETENTION,
    DEFAULT_STREAM,
    ForeignMode,
    RowDecoder,
    Store,
    check_foreign_mode,
    check_stream_name,
    default_foreign_topic,
)
from alkpubsub.topics import validate_topic
from alkpubsub.transport import BaseTransport, Subscription

from ._honker_common import Format, StoreHolder, check_format, database_path, encoder
from ._honker_durable_subscription import HonkerDurableSubscription


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
        ack: str = "batched",
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
        self.ack_mode = check_ack_mode(ack)
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

    async def open_store(self) -> Store:
        """The store on this file, opened (off the loop) on first use."""
        return self._holder.store or await self._holder.get()

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


ACK_MODES = ("batched", "saved")


def check_ack_mode(value: str) -> str:
    """``ack`` must be ``batched`` or ``saved``; raise :class:`ConfigError`."""
    if value not in ACK_MODES:
        raise ConfigError(f"ack={value!r} is not an option value; use ack=batched or ack=saved")
    return value


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
    ack: str = "batched"
    notify_retention: float = Field(DEFAULT_NOTIFY_RETENTION, ge=0)
    foreign: str = "adopt"
    foreign_topic: str | None = None
    format: str = "alkpubsub"
    tenant: str | None = None

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
        database_path(parsed, options.tenant),
        stream=options.stream,
        max_deliveries=options.max_deliveries,
        consumer_ttl=options.consumer_ttl,
        read_batch=options.read_batch,
        ack=options.ack,
        origin=settings.origin if settings else None,
        notify_retention=options.notify_retention,
        foreign=check_foreign_mode(options.foreign),
        foreign_topic=options.foreign_topic,
        format=check_format(options.format),
    )
