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
    sequence. A ``consumer`` name is a durable pull consumer (explicit ack,
    filtered by the pattern's subject): at least once, it resumes after its
    last ack; subscriptions sharing the name split the events. ``start`` applies
    only when the consumer is created: ``"new"``, ``"earliest"`` or a stream
    sequence (inclusive). A subscription asks for no more events than its buffer
    has room for (backpressure, no loss). ``nack(delay=)`` is a JetStream nak;
    the delivery that reaches ``max_deliveries`` failures (nacks, or
    ``ack_wait`` passing without an ack) goes to ``<topic>:dead`` with headers
    ``x-dead-reason``, ``x-deliveries``, ``x-original-id``, ``x-original-offset``,
    ``x-consumer``, and is acked. Closing a subscription naks what it holds
    unacked, so another member gets it at once (that counts as a delivery).
    ``consumer=None`` is an anonymous reader: a server-side ephemeral consumer
    from ``start`` without acks (ack/nack are no-ops), deleted on close.
    Reconnects, broker restarts and lost consumers (memory storage) are healed
    by re-creating the stream/consumer and re-issuing the pull request.

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
    and the connection options of ``nats://`` (name, connect_timeout,
    reconnect_wait, reconnect_timeout, pending_size, tls_*)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Literal

from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.config import ParsedUrl, Settings, parse_options, parse_url
from alkpubsub.errors import ConfigError, ConnectionLost, InvalidTopic, PayloadError, PublishError
from alkpubsub.event import Event
from alkpubsub.topics import dead_letter_topic, validate_topic
from alkpubsub.transport import BaseTransport, Subscription

from ._nats_common import (
    NatsConnection,
    NatsConnectionOptions,
    check_positive,
    check_prefix,
    to_subject,
    to_topic,
    too_big,
)
from ._nats_pull import PullSubscription

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import PubAck

log = logging.getLogger("alkpubsub.nats")

_STREAM_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_CHUNK = 1000  # publish_many: futures in flight at once
_MSG_ID_HEADER = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")  # plus the id itself
_EVENT_ID = 36  # a UUID as text
_RAW_KEPT = 65_536  # characters of a malformed message's text kept in its dead letter


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
        self.max_deliveries = options.max_deliveries or (settings.max_deliveries if settings else 5)
        self._conn = NatsConnection(
            url, options, settings, label=self.name, on_lost=self._lost, on_reconnect=self._healed
        )
        self._js: JetStreamContext | None = None
        self.lost: ConnectionLost | None = None
        self._attempts: set[asyncio.Timeout] = set()
        self._stream_max_msg: int | None = None  # the stream's max_msg_size, if set
        self._max_message = 0  # bytes the server and stream take in one message

    async def connect(self) -> None:
        """Connect and create or bind the stream (idempotent)."""
        self._check_open()
        if self._js is not None:
            return
        await self._conn.open()
        self._js = self._conn.nc.jetstream(timeout=self.options.api_timeout)
        with self._conn.translate(f"setting up stream {self.stream!r}"):
            await self.ensure_stream()
        self._fit_sizes()

    def _fit_sizes(self) -> None:
        """Hold payloads to what the server's max_payload and the stream's
        max_msg_size take with the envelope and our Nats-Msg-Id header."""
        conn = self._conn
        self._max_message = conn.message_limit(self._stream_max_msg)
        self.max_payload_bytes = conn.payload_limit(
            _MSG_ID_HEADER + _EVENT_ID, self._stream_max_msg
        )

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context (after ``connect``)."""
        if self.lost is not None:
            raise self.lost
        if self._js is None:
            raise ConnectionLost(f"{self.name} is not connected; await transport.connect()")
        return self._js

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

    async def _publish(self, event: Event, body: bytes) -> Event:
        ack = await self.store(self.subject(event.topic), event.envelope(body), event.id)
        return event.with_offset(ack.seq)

    async def store(self, subject: str, data: bytes, msg_id: str) -> PubAck:
        """Publish to the stream and wait for its PubAck, retrying with the same
        ``Nats-Msg-Id`` (deduplicated by the server) for up to ``publish_timeout``."""
        if len(data) + _MSG_ID_HEADER + len(msg_id) > self._max_message:
            raise self._too_big(subject, len(data) + _MSG_ID_HEADER + len(msg_id))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.publish_timeout
        try:
            # The first attempt inlines _attempt(): its generator-based context
            # manager and the module imports below cost ~10 us a publish.
            async with asyncio.timeout(
                min(self.options.publish_timeout, self.options.api_timeout)
            ) as scope:
                self._attempts.add(scope)
                try:
                    self._check_open()
                    return await self.js.publish(
                        subject,
                        data,
                        timeout=self.options.publish_timeout + 1,
                        headers={"Nats-Msg-Id": msg_id},
                    )
                finally:
                    self._attempts.discard(scope)
        except Exception as exc:
            first: Exception | None = exc
        return await self._store_retrying(subject, data, msg_id, deadline, first)

    async def _store_retrying(
        self, subject: str, data: bytes, msg_id: str, deadline: float, first: Exception | None
    ) -> PubAck:
        """:meth:`store` after its first attempt failed with ``first``."""
        import nats.errors as nerr
        from nats.js.errors import APIError, NoStreamResponseError

        loop = asyncio.get_running_loop()
        pause, silent = 0.05, 0
        while True:
            left = max(0.05, deadline - loop.time())
            try:
                if first is not None:
                    exc, first = first, None
                    raise exc
                self._check_open()
                async with self._attempt(min(left, self.options.api_timeout)):
                    return await self.js.publish(
                        subject, data, timeout=left + 1, headers={"Nats-Msg-Id": msg_id}
                    )
            except nerr.ConnectionClosedError:
                raise self._conn.lost_error() from None
            except nerr.OutboundBufferLimitError:
                error: Exception = PublishError("the outbound buffer is full while disconnected")
            except nerr.MaxPayloadError:
                raise self._too_big(subject, len(data) + _MSG_ID_HEADER + len(msg_id)) from None
            except TimeoutError as exc:
                error = exc  # no PubAck: server restarting, or a reconnect cut the wait
            except (NoStreamResponseError, nerr.NoRespondersError) as exc:
                # Just after a restart the stream may not listen yet; if it stays
                # silent it is gone (memory storage) and is made again.
                error, silent = exc, silent + 1
                if silent >= 3:
                    await self._try(self.ensure_stream)
            except APIError as exc:
                if exc.err_code == 10054:  # over the stream's max_msg_size (changed since)
                    raise self._too_big(subject, len(data) + _MSG_ID_HEADER + len(msg_id)) from None
                if exc.code != 503:
                    raise PublishError(
                        f"stream {self.stream!r} refused the event on {subject!r}: {exc}"
                    ) from None
                error = exc
            if loop.time() + pause >= deadline:
                raise PublishError(
                    f"{self.name}: no PubAck for the event on {subject!r} within "
                    f"{self.options.publish_timeout:g} s ({error or 'timeout'}); it may or may "
                    "not be stored: publishing the same event again (transport.forward) "
                    f"is deduplicated within duplicate_window={self.options.duplicate_window:g}s"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _too_big(self, subject: str, size: int) -> PayloadError:
        if self._stream_max_msg is not None and self._stream_max_msg == self._max_message:
            return too_big(
                subject, size, self._max_message, f"max_msg_size of stream {self.stream!r}"
            )
        return too_big(subject, size, self._max_message, "the NATS server's max_payload")

    async def _publish_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        import nats.errors as nerr

        done: list[Event] = []
        for start in range(0, len(batch), _CHUNK):
            chunk = [
                (e, self.subject(e.topic), e.envelope(b)) for e, b in batch[start : start + _CHUNK]
            ]
            for _, subject, data in chunk:  # all checked before any is sent
                if len(data) + _MSG_ID_HEADER + _EVENT_ID > self._max_message:
                    raise self._too_big(subject, len(data) + _MSG_ID_HEADER + _EVENT_ID)
            futures: list[asyncio.Future[PubAck]] = []
            try:
                publish_async = self.js.publish_async
                for event, subject, data in chunk:
                    futures.append(
                        await publish_async(subject, data, headers={"Nats-Msg-Id": event.id})
                    )
            except nerr.ConnectionClosedError:
                raise self._conn.lost_error() from None
            except nerr.Error:
                pass  # the rest go through store() below
            if futures:
                with contextlib.suppress(TimeoutError):
                    async with self._attempt(self.options.publish_timeout):
                        await asyncio.wait(futures)
            for i, (event, subject, data) in enumerate(chunk):
                fut = futures[i] if i < len(futures) else None
                if fut is not None and fut.done() and not fut.cancelled() and not fut.exception():
                    done.append(event.with_offset(fut.result().seq))
                else:
                    if fut is not None:
                        fut.cancel()  # frees nats-py's in-flight slot
                    # Same id: a copy that did arrive is dropped by the server.
                    done.append(event.with_offset((await self.store(subject, data, event.id)).seq))
        return done

    @contextlib.asynccontextmanager
    async def _attempt(self, seconds: float) -> AsyncIterator[None]:
        """A time limit for waiting on PubAcks that a reconnect cuts short: acks
        for requests lost with the old connection never come, so retry at once."""
        async with asyncio.timeout(seconds) as scope:
            self._attempts.add(scope)
            try:
                yield
            finally:
                self._attempts.discard(scope)

    # -- dead letters ----------------------------------------------------------

    async def bury(
        self, sub: Subscription, event: Event, msg: Msg, *, reason: str, deliveries: int
    ) -> None:
        """Publish ``event`` to ``<topic>:dead`` with why, then ack the original."""
        consumer = sub.consumer or ""
        headers = {
            **event.headers,
            "x-dead-reason": reason,
            "x-deliveries": str(deliveries),
            "x-original-id": event.id,
            "x-original-offset": str(event.offset),
            "x-consumer": consumer,
        }
        try:
            topic = validate_topic(dead_letter_topic(event.topic))
            dead, body = Event.create(topic, event.payload, origin=self.origin, headers=headers)
            await self.store(
                self.subject(topic), dead.envelope(body), f"{event.id}:dead:{consumer}"
            )
        except (InvalidTopic, PayloadError) as exc:
            log.error("%s: cannot dead-letter %s, dropping it: %s", self.name, event.id, exc)
            await msg.term()
            return
        except (PublishError, ConnectionLost) as exc:
            # Left unacked: redelivered after ack_wait and buried then.
            log.error("%s: cannot dead-letter %s (%s); will retry", self.name, event.id, exc)
            return
        await msg.ack()
        sub.stats.dead_lettered += 1
        self._conn.log_once(
            "dead", "%s: %s went to %s (%s)", self.name, event.id, dead_letter_topic(event.topic),
            reason,
        )  # fmt: skip

    async def bury_malformed(self, sub: Subscription, msg: Msg, detail: str) -> None:
        """Count a message that is not an event; dead-letter its raw text when named."""
        self.report_malformed(sub, "envelope", f"on {msg.subject!r}: {detail}")
        if sub.consumer is None:
            return
        topic = to_topic(self.prefix, msg.subject)
        if topic is not None:
            raw = msg.data.decode(errors="replace")
            if len(raw) > _RAW_KEPT:  # so that the dead letter fits where this did
                detail += f" (its first {_RAW_KEPT} of {len(msg.data)} bytes kept)"
            fake = Event.model_validate(
                {"id": f"malformed-{msg.metadata.sequence.stream}", "topic": topic,
                 "payload": {"raw": raw[:_RAW_KEPT]},
                 "published_at": msg.metadata.timestamp, "offset": msg.metadata.sequence.stream}
            )  # fmt: skip
            await self.bury(sub, fake, msg, reason=f"malformed envelope: {detail}", deliveries=1)
        else:
            await msg.term()

    # -- subscribing -----------------------------------------------------------

    def _subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        return PullSubscription(self, pattern, consumer=consumer, start=start, buffer=buffer)

    # -- connection events -----------------------------------------------------

    async def _try(self, step: Callable[[], Awaitable[None]]) -> bool:
        try:
            async with self._attempt(self.options.api_timeout):
                await step()
            return True
        except Exception as exc:  # logged; the caller retries
            self._conn.log_once(f"heal:{type(exc).__name__}", "%s: %s", self.name, exc)
            return False

    def _healed(self) -> None:
        self._fit_sizes()  # the server may have come back with another max_payload
        now = asyncio.get_running_loop().time()
        for scope in self._attempts:
            scope.reschedule(now)
        for sub in self._subscriptions:
            if isinstance(sub, PullSubscription):
                sub.reconnected()

    def _lost(self, error: ConnectionLost) -> None:
        self.lost = error
        for sub in list(self._subscriptions):
            if isinstance(sub, PullSubscription):
                sub.lost(error)

    async def consumer_stats(self) -> list[dict[str, object]]:
        """Each durable consumer of the stream as the server reports it: the last
        stream sequence delivered, events not yet delivered (lag) and deliveries
        awaiting an ack. Used by ``alkpubsub stats``."""
        with self._conn.translate(f"listing consumers of {self.stream!r}"):
            infos = await self.js.consumers_info(self.stream)
        return [
            {
                "consumer": info.config.durable_name,
                "offset": info.delivered.stream_seq if info.delivered else 0,
                "lag": info.num_pending or 0,
                "unacked": info.num_ack_pending or 0,
            }
            for info in infos
            if info.config.durable_name
        ]

    async def _close(self) -> None:
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
