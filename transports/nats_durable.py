"""NATS JetStream transport: a durable, replayable log with named consumers.

Features
    persistent: yes   replay: yes   ordered: yes   wildcards: yes
    cross_process: yes   cross_node: yes   competing consumers: yes   dead letter: yes
    Events are stored in one JetStream stream (created if missing, else bound)
    on subjects ``<prefix>.<topic tokens>``, ``<prefix>`` derived from the
    stream name. Publishing waits for the server's PubAck, carries the event id
    as ``Nats-Msg-Id`` (the server drops a re-sent id within
    ``duplicate_window``) and retries on its own for up to ``publish_timeout``,
    across a broker restart, without duplicates; ``event.offset`` is the stream
    sequence. ``forward_many`` (the outbox relay) reports a copy the server
    dropped as ``duplicate``, with the original's sequence, and refuses only
    the events too large for the server or stream. A ``consumer`` name is a
    durable pull consumer (explicit ack, filtered by the pattern's subject):
    at least once, it resumes after its last ack; subscriptions sharing the
    name split the events. ``start`` applies
    only when the consumer is created: ``"new"``, ``"earliest"`` or a stream
    sequence (inclusive). A subscription asks for no more events than its buffer
    has room for (backpressure, no loss), and a member of a named consumer holds
    at most ``prefetch`` deliveries unacked, so a member killed while behind
    delays only its own deliveries (by ``ack_wait``), never the other members.
    ``ack_wait``, ``max_ack_pending`` and ``max_deliveries`` are set on the
    consumer, also on an existing one whose values differ. ``nack(delay=)`` is
    a JetStream nak; the delivery that reaches ``max_deliveries`` failures
    (nacks, or ``ack_wait`` passing without an ack) goes to ``dead:<topic>``
    (subject ``<stream>.dead.<topic>``), built by ``alkpubsub.deadletter``
    (``x-dead-reason`` = ``nack(reason=)``, ``x-dead-kind``, ``x-deliveries``,
    ``x-consumer``, ``x-original-id``/``-topic``/``-offset``) with its
    deterministic id as ``Nats-Msg-Id`` (a re-bury is deduplicated), and is
    acked. A dead letter is never dead-lettered again: one that fails is
    redelivered after the nack delay. Only patterns naming ``dead`` first see
    dead letters; a consumer on ``>`` acks them unseen. Closing a subscription
    naks what it holds unacked, so another member gets it at once (that
    counts as a delivery).
    ``consumer=None`` is an anonymous reader: a server-side ephemeral consumer
    from ``start`` without acks (ack/nack are no-ops), deleted on close.
    Reconnects, broker restarts and lost consumers (memory storage) are healed
    by re-creating the stream/consumer and re-issuing the pull request.
    ``max_payload_bytes`` is lowered after connect when the server's
    ``max_payload`` or the stream's ``max_msg_size`` cannot carry the largest
    payload with its envelope; a message over either is a ``PayloadError`` at
    publish. Reading accepts our envelope and CloudEvents (structured, or
    binary in ``ce-*`` headers) whatever ``format`` says; ``Nats-Msg-Id`` is
    the event id in every format. A foreign message (JSON or UTF-8 text that
    is not an event) is adopted by default: topic = the subject's, id = uuid5
    of stream and sequence (a redelivery keeps it), payload = the JSON (else
    the text), header ``x-alk-foreign: json|text``, ``published_at`` = the
    stream's timestamp, origin ``foreign``. Malformed messages (not UTF-8, a
    broken envelope, an envelope or CloudEvent of another topic) are counted
    in ``stats.malformed`` and dead-lettered with their text on named
    consumers: they never hold a consumer, and none is acked unless it was
    delivered, dead-lettered or outside the pattern.

Connection String
    ``nats+durable://[user:password@|token@]host[:4222]?stream=EVENTS``
    ``tls+durable://host[:4222]?stream=EVENTS`` (TLS as for ``tls://``)

Transport Options
    stream            ``EVENTS``  stream name ([A-Za-z0-9_-])
    subjects          ``<stream>.>``  the stream's subjects; must end in ``.>``
    storage           ``file``    ``file`` or ``memory``
    retention         ``limits``  ``limits``, ``interest`` or ``workqueue``
    max_age           0           seconds events are kept (0 = no limit)
    duplicate_window  120         seconds the server remembers event ids
    replicas          1           stream replicas (clustered servers)
    ack_wait          30          seconds before an unacked delivery counts as failed
    max_ack_pending   10000       deliveries the consumer leaves unacked at most (all
                                  members together); set on consumers we create, and
                                  on existing ones when they differ
    prefetch          256         deliveries one member holds unacked at most (asked
                                  for, buffered, handed out); <= max_ack_pending/2, so
                                  a killed member stalls only its own until ack_wait
    max_deliveries    5           failed deliveries before dead-lettering
                                  (else ``Settings.max_deliveries``)
    batch             64          most events asked for per pull request
    fetch_timeout     5           seconds a pull request waits on the server
    publish_timeout   10          seconds a publish keeps retrying before ``PublishError``
    api_timeout       5           seconds for one JetStream API request
    format            ``alkpubsub``  what publish writes: ``alkpubsub`` (our envelope),
                                  ``cloudevents`` (structured CloudEvent) or
                                  ``cloudevents-binary`` (``ce-*`` headers, JSON body)
    foreign           ``adopt``   messages that are not events: ``adopt`` (as above),
                                  ``dead_letter`` (named consumers bury them; others
                                  count and drop) or ``drop`` (counted as malformed)
    and the connection options of ``nats://`` (name, connect_timeout,
    reconnect_wait, reconnect_timeout, pending_size, tls_*)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

from alkpubsub.abilities import DEFAULT_MAX_DELIVERIES, ConsumerStat, Forwarded
from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.config import ParsedUrl, Settings, parse_options, parse_url
from alkpubsub.errors import ConfigError, ConnectionLost
from alkpubsub.event import Event
from alkpubsub.transport import BaseTransport, Subscription

from ._nats_common import (
    NatsConnectionOptions,
    check_positive,
    check_prefix,
    to_subject,
)
from ._nats_connection import NatsConnection
from ._nats_consumer import ConsumerSettings
from ._nats_decode import Foreign, Format, encode
from ._nats_pull import PullSubscription
from ._nats_store import StreamWriter, WriterSettings

if TYPE_CHECKING:
    from nats.js import JetStreamContext

log = logging.getLogger("alkpubsub.nats")

_STREAM_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")


class NatsDurableOptions(NatsConnectionOptions):
    """Options of ``nats+durable://`` URLs."""

    stream: str = "EVENTS"
    subjects: str | None = None
    storage: Literal["file", "memory"] = "file"
    retention: Literal["limits", "interest", "workqueue"] = "limits"
    max_age: float = 0
    duplicate_window: float = 120
    replicas: int = 1
    ack_wait: float = 30
    max_ack_pending: int = 10_000
    prefetch: int = 256
    max_deliveries: int | None = None
    batch: int = 64
    fetch_timeout: float = 5
    publish_timeout: float = 10
    api_timeout: float = 5
    format: Format = "alkpubsub"
    foreign: Foreign = "adopt"


class NatsDurableTransport(BaseTransport):
    """Durable publish/subscribe on a JetStream stream."""

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
        self, url: ParsedUrl, options: NatsDurableOptions, settings: Settings | None = None
    ) -> None:
        super().__init__(origin=settings.origin if settings else None)
        self.name = url.redacted
        self.options = options
        self.stream = options.stream
        self.subjects = options.subjects or f"{options.stream}.>"
        self.prefix = check_prefix(self.subjects[:-2], "subjects")
        self._max_deliveries = options.max_deliveries or (
            settings.max_deliveries if settings else DEFAULT_MAX_DELIVERIES
        )
        self._conn = NatsConnection(
            url, options, settings, label=self.name, on_lost=self._lost, on_reconnect=self._healed
        )
        self._js: JetStreamContext | None = None
        self.lost: ConnectionLost | None = None
        self._stream_max_msg: int | None = None  # the stream's max_msg_size, if set
        self.consumer_settings = ConsumerSettings(
            label=self.name, stream=self.stream, subjects=self.subjects,
            ack_wait=options.ack_wait, max_ack_pending=options.max_ack_pending,
            prefetch=options.prefetch, max_deliveries=self._max_deliveries,
            inactive_threshold=options.reconnect_timeout + 30,
        )  # fmt: skip
        self.writer = StreamWriter(
            self._conn,
            WriterSettings(
                options.stream, options.publish_timeout, options.api_timeout,
                options.duplicate_window,
            ),
            js=lambda: self.js,
            check_open=self.check_open,
            recreate_stream=lambda: self._try(self.ensure_stream),
        )  # fmt: skip

    async def connect(self) -> None:
        """Connect and create or bind the stream (idempotent)."""
        self.check_open()
        if self._js is not None:
            return
        await self._conn.open()
        self._js = self._conn.nc.jetstream(timeout=self.options.api_timeout)
        with self._conn.translate(f"setting up stream {self.stream!r}"):
            await self.ensure_stream()
        self.max_payload_bytes = self.writer.fit(self._stream_max_msg)

    @property
    def max_deliveries(self) -> int:
        """Failed deliveries of an event before it is dead-lettered (DeadLetterPolicy)."""
        return self._max_deliveries

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context (after ``connect``)."""
        if self.lost is not None:
            raise self.lost
        if self._js is None:
            raise ConnectionLost(f"{self.name} is not connected; await transport.connect()")
        return self._js

    def log_once(self, kind: str, message: str, *args: object) -> None:
        """Log a warning the first time ``kind`` happens on this transport's connection."""
        self._conn.log_once(kind, message, *args)

    def subject(self, topic_or_pattern: str) -> str:
        """The subject of a topic, or the subject filter of a pattern."""
        return to_subject(self.prefix, topic_or_pattern)

    # -- stream --------------------------------------------------------------

    async def ensure_stream(self) -> None:
        """Create the stream, or bind an existing one that carries our subjects."""
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig
        from nats.js.errors import BadRequestError, ServiceUnavailableError

        opts = self.options
        config = StreamConfig(
            name=self.stream,
            subjects=[self.subjects],
            storage=StorageType(opts.storage),
            retention=RetentionPolicy(opts.retention),
            max_age=opts.max_age or None,
            duplicate_window=opts.duplicate_window,
            num_replicas=opts.replicas,
        )
        try:
            info = await self.js.add_stream(config)
        except ServiceUnavailableError:
            raise ConfigError(
                f"JetStream does not answer at {self.name!r}; start nats-server with -js "
                "(JetStream enabled), or use nats:// for live events only"
            ) from None
        except BadRequestError as exc:
            if exc.err_code == 10065:
                raise ConfigError(
                    f"stream {self.stream!r}: subjects {self.subjects!r} overlap another "
                    "stream's; choose another stream= or subjects="
                ) from None
            if exc.err_code != 10058:
                raise ConfigError(f"cannot create stream {self.stream!r}: {exc}") from None
            # It exists with other settings (made by someone else): bind it.
            info = await self.js.stream_info(self.stream)
            if self.subjects not in (info.config.subjects or []):
                raise ConfigError(
                    f"stream {self.stream!r} exists with subjects {info.config.subjects} "
                    f"and not {self.subjects!r}; pass subjects= to match it or pick "
                    "another stream="
                ) from None
        limit = info.config.max_msg_size
        self._stream_max_msg = limit if limit is not None and limit > 0 else None

    # -- publishing ----------------------------------------------------------

    async def send(self, event: Event, body: bytes) -> Event:
        subject = self.subject(event.topic)
        if self.options.format == "alkpubsub":
            ack = await self.writer.store(subject, event.envelope(body), event.id)
        else:
            data, headers = encode(event, body, self.options.format)
            ack = await self.writer.store(subject, data, event.id, headers)
        return event.with_offset(ack.seq)

    async def send_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        fmt = self.options.format
        items = [(self.subject(e.topic), *encode(e, b, fmt), e.id) for e, b in batch]
        acks = await self.writer.store_many([(s, d, i, h) for s, d, h, i in items])
        return [event.with_offset(ack.seq) for (event, _), ack in zip(batch, acks, strict=True)]

    async def forward_batch(self, batch: list[tuple[Event, bytes]]) -> list[Forwarded]:
        """Store the events with many PubAcks in flight, in order; an id the
        stream already held within ``duplicate_window`` is dropped by the server
        and reported ``duplicate`` (with the original's sequence as offset). An
        event the server or stream can never take (its size with the NATS
        headers) is ``refused`` and the others are still stored."""
        fmt, writer = self.options.format, self.writer
        results: list[Forwarded | None] = []
        items: list[tuple[str, bytes, str, dict[str, str] | None]] = []
        for event, body in batch:
            subject = self.subject(event.topic)
            data, headers = encode(event, body, fmt)
            refused = writer.refusal(subject, data, event.id, headers)
            if refused is not None:
                results.append(Forwarded(event, refused=refused))
                continue
            results.append(None)
            items.append((subject, data, event.id, headers))
        acks = iter(await writer.store_many(items) if items else [])
        done: list[Forwarded] = []
        for (event, _), result in zip(batch, results, strict=True):
            if result is None:
                ack = next(acks)
                result = Forwarded(event.with_offset(ack.seq), duplicate=bool(ack.duplicate))
            done.append(result)
        return done

    # -- subscribing -----------------------------------------------------------

    def make_subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        return PullSubscription(self, pattern, consumer=consumer, start=start, buffer=buffer)

    # -- connection events -----------------------------------------------------

    async def _try(self, step: Callable[[], Awaitable[None]]) -> bool:
        try:
            async with self.writer.attempt(self.options.api_timeout):
                await step()
            return True
        except Exception as exc:  # logged; the caller retries
            self._conn.log_once(f"heal:{type(exc).__name__}", "%s: %s", self.name, exc)
            return False

    def _healed(self) -> None:
        # The server may have come back with another max_payload.
        self.max_payload_bytes = self.writer.fit(self._stream_max_msg)
        self.writer.cut_short()
        for sub in self._subscriptions:
            if isinstance(sub, PullSubscription):
                sub.reconnected()

    def _lost(self, error: ConnectionLost) -> None:
        self.lost = error
        for sub in list(self._subscriptions):
            if isinstance(sub, PullSubscription):
                sub.lost(error)

    async def consumer_stats(self) -> list[ConsumerStat]:
        """Each durable consumer of the stream as the server reports it: the last
        stream sequence delivered, events not yet delivered (lag) and deliveries
        awaiting an ack. Used by ``alkpubsub stats``."""
        with self._conn.translate(f"listing consumers of {self.stream!r}"):
            infos = await self.js.consumers_info(self.stream)
        return [
            ConsumerStat(
                consumer=info.config.durable_name,
                offset=info.delivered.stream_seq if info.delivered else 0,
                lag=info.num_pending or 0,
                unacked=info.num_ack_pending or 0,
            )
            for info in infos
            if info.config.durable_name
        ]

    async def disconnect(self) -> None:
        await self._conn.close()


def from_url(url: str, settings: Settings | None = None) -> NatsDurableTransport:
    """Build a JetStream transport from ``nats+durable://`` or ``tls+durable://``."""
    parsed = parse_url(url)
    options = parse_options(NatsDurableOptions, parsed, settings)
    check_positive(
        options, parsed, "connect_timeout", "reconnect_wait", "reconnect_timeout", "pending_size",
        "duplicate_window", "replicas", "ack_wait", "max_ack_pending", "prefetch",
        "max_deliveries", "batch", "fetch_timeout",
        "publish_timeout", "api_timeout",
    )  # fmt: skip
    if options.max_age < 0:
        raise ConfigError(f"option max_age={options.max_age!r} in {parsed.redacted!r} must be >= 0")
    if options.prefetch > options.max_ack_pending // 2:
        raise ConfigError(
            f"prefetch={options.prefetch} in {parsed.redacted!r} must be at most half of "
            f"max_ack_pending={options.max_ack_pending}, or one member holding its prefetch "
            "stops the whole consumer; lower prefetch= or raise max_ack_pending="
        )
    if not _STREAM_NAME.fullmatch(options.stream):
        raise ConfigError(
            f"stream={options.stream!r} in {parsed.redacted!r} is not a JetStream stream name; "
            "use 1..64 characters of [A-Za-z0-9_-]"
        )
    if options.subjects is not None and not options.subjects.endswith(".>"):
        raise ConfigError(
            f"subjects={options.subjects!r} in {parsed.redacted!r} must be '<prefix>.>', "
            "e.g. 'EVENTS.>'"
        )
    return NatsDurableTransport(parsed, options, settings)
