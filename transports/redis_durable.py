"""Redis Streams transport: durable events with consumer groups.

Features
    persistent: yes   replay: yes   consumer offsets: yes   competing consumers: yes
    ordered: yes   wildcards: yes   dead letter: yes   cross_process/cross_node: yes
    All topics share one stream key (``stream``); an entry holds the fields
    ``topic`` and ``event`` (the JSON envelope; see ``format``). ``event.offset``
    packs the entry id ``<ms>-<seq>`` as ``ms * 2**20 + seq`` (increasing, unique).

    A ``consumer`` name is a consumer group, created on first use at ``start``
    ("new" -> ``$``, "earliest" -> ``0``, an offset -> that entry, inclusive);
    afterwards the group resumes after its last acked entry. Each subscription
    is its own group member, so subscriptions sharing a name split the events.
    Entries whose topic the pattern does not match are acked unseen: give every
    subscription of one consumer the same pattern. Without ``consumer`` a
    subscription gets a private group (``start`` applies) that is destroyed
    when it closes: every event, no kept position.

    Members read with XREADGROUP in batches into the bounded buffer (a full
    buffer pauses reading) and ack with batched XACKs. A live member keeps what
    it holds by refreshing the entries' idle time; ``nack(delay)`` sets an
    entry's idle time so that it becomes claimable after ``delay``; closing
    hands unacked entries back at once. Entries of a crashed member become
    claimable after ``claim_idle``. Every member claims due entries with
    XAUTOCLAIM (each second, or sooner when it nacks).

    Dead letters (``alkpubsub.deadletter``): when the last of
    ``max_deliveries`` deliveries fails (nacked, or claimed once more), the
    event is added to the same stream as topic ``dead:<topic>`` (headers
    ``x-dead-reason`` = the ``nack(reason=)``, ``x-dead-kind``,
    ``x-deliveries``, ``x-consumer``, ``x-original-id``/``-topic``/``-offset``)
    and acked, in one MULTI. Only patterns that name ``dead`` first match them:
    any other group (``>`` too) acks them unseen, not as malformed. A dead
    letter that keeps failing is redelivered after the nack delay, never
    dead-lettered again.

    Reading (``_redis_decode.py``, decision 004): an entry's topic is its
    ``topic`` field, else the stream key. Its ``event`` field holds an
    envelope or a structured CloudEvent; ``ce_*`` fields with the body in
    ``data`` are a binary CloudEvent; any other entry is *foreign* and, with
    ``foreign=adopt``, becomes an event: a lone ``data``/``payload`` field's
    JSON (or text), else the fields as one JSON object; id ``uuid5`` of stream
    and entry id (a redelivery keeps it), time = the entry id's, origin
    ``foreign``, header ``x-alk-foreign: json|text``. ``foreign=dead_letter``
    dead-letters them (named consumers; on ``dead:`` topics they are dropped,
    no chains), ``drop`` counts them in
    ``stats.malformed`` and acks them. Malformed entries (not UTF-8, an
    ``event`` that is no valid envelope, an envelope for another topic,
    beyond the publish limits) count in ``stats.malformed``; a named consumer
    dead-letters them (kind ``malformed``, the first 64 KiB of text; to
    ``dead:unknown`` when the entry names no valid topic), so its position
    never passes an entry it neither delivered nor dead-lettered; an anonymous
    one acks them. Nothing stops the member. Entries up to the publish limit
    (1,000,000 bytes of payload JSON) are delivered.

    While the broker is away every call is retried (the first at once, then
    every 10-20 ms for 5 s, then doubling from 50 ms to 1 s);
    ``stats.reconnects`` counts each recovery and ``stats.offline_ms`` the time
    the reader could not read. After ``reconnect_timeout`` the iterator raises
    :class:`ConnectionLost` after its buffered events. Unacked entries stay in
    the group and come back: nothing is lost while the broker is away.

    XADD trims the stream to about ``maxlen`` entries: trimming does not wait
    for consumer groups, so a group further behind than ``maxlen`` loses the
    oldest entries. Size ``maxlen`` for the longest outage of a consumer.
    Publishes retry twice within ~1 s, then raise :class:`ConnectionLost`
    (a retried publish may be stored twice, with the same event id).

    Forwarding (``forward``, ``forward_many``: the outbox relay, a composite
    leg) deduplicates by event id within ``dedupe_window`` seconds: an id
    forwarded again is not added again, and is reported ``duplicate`` with the
    original entry's offset, across relay crashes and restarts and between
    concurrent relays (an atomic Lua script per event sets the key
    ``alkpubsub:dedupe:{<stream>}:<event id>``, holding the entry id, and adds
    the entry; a batch is one pipelined round trip). The keys persist with
    the server's data and expire with the window; they cost ~200 bytes per
    event in the window (``_redis_dedupe.py``). ``publish`` never pays for
    it. Redis Cluster is not supported (the keys carry the stream's hash tag,
    but nothing else is cluster-aware).

Connection String
    ``redis+durable://[[user]:password@]host[:6379][/db]?stream=events``
    ``rediss+durable://...`` for TLS (files from ``Settings.tls_*``)

Transport Options
    stream = "events"             stream key (``[A-Za-z0-9_.:-]``, 1..200)
    maxlen = 1000000              approximate stream length cap; 0 = no cap
    claim_idle = 30.0             seconds before a silent member's entries are claimed
    max_deliveries = 5            deliveries before dead-lettering (else Settings.max_deliveries)
    format = "alkpubsub"          what XADD writes: ``alkpubsub`` (fields topic, event),
                                  ``cloudevents`` (topic, data = structured CloudEvent) or
                                  ``cloudevents-binary`` (topic, ce_<attr>..., content-type,
                                  data); every format is read whatever this says
    foreign = "adopt"             entries of other writers: ``adopt``, ``dead_letter``, ``drop``
    batch = 100                   entries per XREADGROUP / XAUTOCLAIM
    reconnect_timeout = 30.0      seconds an outage may last before subscriptions fail
    connect_timeout = 5.0         seconds to open a TCP connection
    dedupe_window = 120.0         seconds a forwarded event id is remembered (0 = forward
                                  without dedupe; at most 30 days)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from redis import exceptions as rex

from alkpubsub.abilities import DEFAULT_MAX_DELIVERIES, ConsumerStat, Forwarded
from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.cloudevents import to_binary, to_structured
from alkpubsub.config import Settings, TransportOptions, parse_options, parse_url
from alkpubsub.errors import InvalidTopic
from alkpubsub.event import Event
from alkpubsub.topics import validate_topic
from alkpubsub.transport import BaseTransport, Subscription

from ._redis_common import (
    CONNECTION_ERRORS,
    RedisTarget,
    close_client,
    id_to_offset,
    is_auth_error,
    redis_target,
    translate,
)
from ._redis_dedupe import MAX_WINDOW, XADD_SCRIPT, DedupeScript, entry_offset, forward_one
from ._redis_subscription import BLOCK_MS, RedisStreamSubscription


class RedisDurableOptions(TransportOptions):
    """Options of ``redis+durable://`` URLs (see the module docstring)."""

    stream: str = Field("events", pattern=r"^[A-Za-z0-9_.:\-]{1,200}$")
    maxlen: int = Field(1_000_000, ge=0)
    claim_idle: float = Field(30.0, gt=0)
    max_deliveries: int = Field(DEFAULT_MAX_DELIVERIES, ge=1)
    format: Literal["alkpubsub", "cloudevents", "cloudevents-binary"] = "alkpubsub"
    foreign: Literal["adopt", "dead_letter", "drop"] = "adopt"
    batch: int = Field(100, ge=1, le=10_000)
    reconnect_timeout: float = Field(30.0, ge=0)
    connect_timeout: float = Field(5.0, gt=0)
    dedupe_window: float = Field(120.0, ge=0, le=MAX_WINDOW)


class RedisDurableTransport(BaseTransport):
    """Durable publish/subscribe over one Redis stream with consumer groups."""

    capabilities = Capabilities(
        persistent=True,
        replay=True,
        consumer_offsets=True,
        competing_consumers=True,
        ordered=True,
        cross_process=True,
        cross_node=True,
        wildcards=True,
        dead_letter=True,
    )

    def __init__(
        self,
        target: RedisTarget,
        options: RedisDurableOptions,
        *,
        max_deliveries: int | None = None,
        origin: str | None = None,
    ) -> None:
        super().__init__(origin=origin)
        self.name = f"{target.label}?stream={options.stream}"
        self.target = target
        self.options = options
        self.stream = options.stream
        self._max_deliveries = max_deliveries or options.max_deliveries
        try:
            self.stream_topic: str | None = validate_topic(options.stream)
        except InvalidTopic:
            self.stream_topic = None  # entries without a topic field then name none
        self._claim_ms = int(options.claim_idle * 1000)
        self._claim_every = min(1.0, options.claim_idle / 2)
        self._trim: dict[str, Any] = (
            {"maxlen": options.maxlen, "approximate": True} if options.maxlen else {}
        )
        trim = (b"MAXLEN", b"~", str(options.maxlen).encode()) if options.maxlen else ()
        self._xadd_head = (b"XADD", self.stream.encode(), *trim, b"*")
        self._dedupe: DedupeScript | None = None
        if options.dedupe_window > 0:
            scope = b"{%b}:" % self.stream.encode()  # the stream key's hash slot
            between = self._xadd_head[2:]  # trim, "*"
            self._dedupe = DedupeScript(
                XADD_SCRIPT, target, options.dedupe_window, scope,
                keys=(self._xadd_head[1],), args=(b"%d" % len(between), *between),
            )  # fmt: skip
        self._client = target.client(retries=2, connect_timeout=options.connect_timeout)
        self._io = target.client(
            retries=0, connect_timeout=options.connect_timeout, read_timeout=BLOCK_MS / 1000 + 10
        )
        self._connected = False

    async def connect(self) -> None:
        """Check that the server answers (and accepts the credentials)."""
        if self._connected:
            return
        try:
            await self._client.ping()
        except Exception as exc:
            if isinstance(exc, CONNECTION_ERRORS) or is_auth_error(exc):
                raise translate(exc, self.target, "connecting") from None
            raise
        self._connected = True

    @property
    def max_deliveries(self) -> int:
        """Deliveries of one event before it is dead-lettered (DeadLetterPolicy)."""
        return self._max_deliveries

    def entry_fields(self, event: Event, body: bytes) -> tuple[bytes, ...]:
        """The stream entry of ``event`` as field/value pairs, in ``format``."""
        topic = event.topic.encode()
        if self.options.format == "alkpubsub":
            return (b"topic", topic, b"event", event.envelope(body))
        if self.options.format == "cloudevents":
            return (b"topic", topic, b"data", to_structured(event, body))
        headers, data = to_binary(event, body)
        pairs = [b"topic", topic]
        for name, value in headers.items():
            field = "ce_" + name[3:] if name.startswith("ce-") else name
            pairs += [field.encode(), value.encode()]
        return (*pairs, b"data", data)

    def _xadd(self, event: Event, body: bytes) -> tuple[bytes, ...]:
        """The XADD command for ``event``, as bytes: the same entry ``xadd()``
        writes, without its argument handling and str encoding (~1 us an event)."""
        if self.options.format == "alkpubsub":
            envelope = event.envelope(body)
            return (*self._xadd_head, b"topic", event.topic.encode(), b"event", envelope)
        return (*self._xadd_head, *self.entry_fields(event, body))

    async def send(self, event: Event, body: bytes) -> Event:
        try:
            command = self._client.execute_command
            entry_id = await command(*self._xadd(event, body))  # type: ignore[no-untyped-call]
        except CONNECTION_ERRORS as exc:
            raise translate(exc, self.target, f"publishing to {event.topic!r}") from None
        return event.with_offset(id_to_offset(entry_id))

    async def send_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        pipe = self._client.pipeline(transaction=False)
        command, xadd = pipe.execute_command, self._xadd
        for event, body in batch:
            command(*xadd(event, body))
        try:
            ids = await pipe.execute()
        except CONNECTION_ERRORS as exc:
            raise translate(exc, self.target, f"publishing {len(batch)} events") from None
        return [e.with_offset(id_to_offset(i)) for (e, _), i in zip(batch, ids, strict=True)]

    async def forward(self, event: Event) -> Event:
        """Add an existing event unchanged, deduplicated by id within
        ``dedupe_window`` (a duplicate returns with the original's offset)."""
        if self._dedupe is None:
            return await super().forward(event)
        return await forward_one(self, event)

    async def forward_batch(self, batch: list[tuple[Event, bytes]]) -> list[Forwarded]:
        """Add the events in one pipelined round trip, in order, each unless its
        id was forwarded within ``dedupe_window`` (see the module docstring)."""
        dedupe = self._dedupe
        if dedupe is None:
            return await super().forward_batch(batch)
        key, fields = dedupe.key, self.entry_fields
        items = []
        for event, body in batch:
            entry = fields(event, body)
            items.append((key(event.id), (b"%d" % len(entry), *entry)))
        out = await dedupe.run(self._client, items, f"forwarding {len(batch)} events")
        return [
            Forwarded(event.with_offset(entry_offset(entry)), duplicate=not added)
            for (event, _), added, entry in zip(batch, out[::2], out[1::2], strict=True)
        ]

    def make_subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        return RedisStreamSubscription(self, pattern, consumer=consumer, start=start, buffer=buffer)

    async def consumer_stats(self) -> list[ConsumerStat]:
        """Each named consumer (group) of the stream as Redis reports it: the
        offset last delivered, entries not yet delivered (lag, when Redis knows)
        and deliveries awaiting an ack. Used by ``alkpubsub stats``."""
        try:
            groups = await self._client.xinfo_groups(self.stream)
        except CONNECTION_ERRORS as exc:
            raise translate(exc, self.target, f"listing groups of {self.stream!r}") from None
        except rex.ResponseError:
            return []  # no stream yet
        rows: list[ConsumerStat] = []
        for group in groups:
            name = group["name"].decode()
            if name.startswith("alk.anon-"):
                continue
            rows.append(
                ConsumerStat(
                    consumer=name,
                    offset=id_to_offset(group["last-delivered-id"]),
                    lag=group.get("lag"),
                    unacked=group["pending"],
                )
            )
        return rows

    async def disconnect(self) -> None:
        await close_client(self._io)
        await close_client(self._client)


def from_url(url: str, settings: Settings | None = None) -> RedisDurableTransport:
    """Build a Redis Streams transport from ``redis+durable://`` or ``rediss+durable://``."""
    parsed = parse_url(url)
    options = parse_options(RedisDurableOptions, parsed, settings)
    target = redis_target(parsed, settings)
    explicit = "max_deliveries" in parsed.query or (
        settings is not None and "max_deliveries" in settings.options
    )
    return RedisDurableTransport(
        target,
        options,
        max_deliveries=None if explicit or settings is None else settings.max_deliveries,
        origin=settings.origin if settings else None,
    )
