"""NATS core transport: live events over plain NATS subjects.

Features
    persistent: no   replay: no   ordered: yes   wildcards: yes
    cross_process: yes   cross_node: yes   competing consumers: no   dead letter: no
    Live events only, at most once. One NATS connection per transport and one
    NATS subscription per distinct pattern, shared by every subscription of
    that pattern; the server filters by subject and each subscription also
    checks the project's own matcher. Buffers are bounded: overflow drops the
    oldest event and counts it in ``stats.dropped`` (as do messages nats-py
    drops for a slow consumer). nats-py reconnects on its own and replays the
    subscriptions (``stats.reconnects`` counts it); events published while the
    link is down are lost. Publishes made during a disconnect wait in nats-py's
    outbound buffer (``pending_size``) and are sent on reconnect; a full buffer
    raises ``PublishError``. After ``reconnect_timeout`` seconds without a
    server the transport gives up: iterators raise ``ConnectionLost``, and so
    does ``publish``. ``max_payload_bytes`` is lowered after connect when the
    server's ``max_payload`` cannot carry the largest payload with its envelope;
    a message over it is a ``PayloadError`` at publish (nats-server would close
    the connection). Reading accepts our envelope and CloudEvents (structured,
    or binary in ``ce-*`` NATS headers) whatever ``format`` says; the subject's
    topic is the event's topic. A foreign message (JSON or UTF-8 text that is
    not an event) is adopted by default: topic = the subject's, id = uuid5 of
    subject and body, payload = the JSON (else the text), header
    ``x-alk-foreign: json|text``, origin ``foreign``. Malformed messages (not
    UTF-8, a broken envelope, an envelope or CloudEvent of another topic, a
    subject that is not a topic's) are counted in ``stats.malformed`` and
    delivery goes on. Dead letters (a JetStream stream on this prefix) match
    only patterns naming ``dead`` first: ``>`` never sees them.

    Core NATS keeps nothing, so it cannot deduplicate: ``forward`` and
    ``forward_many`` publish every event handed to them, and an event relayed
    twice (a relay killed before it saved its position) arrives twice.
    Relay to ``nats+durable://`` (the server drops a re-sent ``Nats-Msg-Id``
    within ``duplicate_window``) or let subscribers deduplicate by event id.

Connection String
    ``nats://[user:password@|token@]host[:4222][?options]``
    ``tls://host[:4222]`` (TLS; ``tls_ca``/``tls_cert``/``tls_key`` from the
    query or ``Settings``). Credentials may also come from ``Settings``
    (username/password or token). They never appear in logs, reprs or errors.

Transport Options
    prefix            ``alk``   subject prefix (``''`` for none); ``graph:created``
                                travels as ``alk.graph.created``
    name              none      connection name shown in NATS monitoring
    connect_timeout   5         seconds to get the first connection
    reconnect_wait    0.5       seconds between reconnect attempts
    reconnect_timeout 60        seconds without a server before giving up
    pending_size      2097152   bytes of publishes buffered while disconnected
    pending_limit     524288    messages nats-py queues per pattern before it
                                drops (a stalled event loop); counted as dropped
    tls_ca, tls_cert, tls_key   none   TLS files (or ``Settings.tls_*``)
    tls_hostname      none      server name to verify, if not the URL's host
    format            ``alkpubsub``  what publish writes: ``alkpubsub`` (our envelope),
                                ``cloudevents`` (structured CloudEvent) or
                                ``cloudevents-binary`` (``ce-*`` headers, JSON body)
    foreign           ``adopt``  messages that are not events: ``adopt`` (as above),
                                ``dead_letter`` or ``drop`` (no dead letters on
                                nats://: both count them as malformed and drop them)
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.config import ParsedUrl, Settings, parse_options, parse_url
from alkpubsub.errors import ConnectionLost, PayloadError, PublishError
from alkpubsub.event import Event
from alkpubsub.topics import Pattern
from alkpubsub.transport import BaseTransport, Subscription

from ._nats_common import (
    NatsConnectionOptions,
    check_positive,
    check_prefix,
    to_subject,
    to_topic,
    too_big,
)
from ._nats_connection import NatsConnection
from ._nats_decode import Foreign, Format, adopt, decode, encode, headers_size

SUB_SETTLE = 0.005
"""Seconds a new subscription waits after the server confirmed its SUB, before
subscribe() returns (see NatsTransport._attach)."""

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as NatsSub


class NatsOptions(NatsConnectionOptions):
    """Options of ``nats://`` URLs."""

    prefix: str = "alk"
    pending_limit: int = 524288
    format: Format = "alkpubsub"
    foreign: Foreign = "adopt"


class NatsSubscription(Subscription):
    """A live subscription; its pattern's NATS subscription feeds it."""

    transport: NatsTransport

    async def on_start(self) -> None:
        await self.transport._attach(self)

    async def on_close(self) -> None:
        await self.transport._detach(self)


class _PatternGroup:
    """The subscriptions of one pattern and the NATS subscription they share."""

    __slots__ = ("nats_sub", "pattern", "subs")

    def __init__(self, pattern: Pattern) -> None:
        self.pattern = pattern
        self.subs: list[NatsSubscription] = []
        self.nats_sub: NatsSub | None = None


class NatsTransport(BaseTransport):
    """Publish/subscribe over NATS core subjects."""

    capabilities = Capabilities(ordered=True, cross_process=True, cross_node=True, wildcards=True)

    def __init__(
        self, url: ParsedUrl, options: NatsOptions, settings: Settings | None = None
    ) -> None:
        super().__init__(origin=settings.origin if settings else None)
        self.name = url.redacted
        self.prefix = check_prefix(options.prefix)
        self.options = options
        self._conn = NatsConnection(
            url,
            options,
            settings,
            label=self.name,
            on_lost=self._lost,
            on_reconnect=self._reconnected,
            on_slow_consumer=self._slow_consumer,
        )
        self._groups: dict[str, _PatternGroup] = {}
        self._by_nats_sub: dict[int, _PatternGroup] = {}
        self._lock = asyncio.Lock()
        self._lost_error: ConnectionLost | None = None

    async def connect(self) -> None:
        """Connect to the server (idempotent)."""
        self.check_open()
        await self._conn.open()
        self.max_payload_bytes = self._conn.payload_limit(nats_headers=0)

    def subject(self, topic: str) -> str:
        """The NATS subject ``topic`` travels on."""
        return to_subject(self.prefix, topic)

    # -- publishing --------------------------------------------------------

    async def send(self, event: Event, body: bytes) -> Event:
        if self.options.format == "alkpubsub":
            await self._send(self.subject(event.topic), event.envelope(body))
        else:
            await self._send(self.subject(event.topic), *encode(event, body, self.options.format))
        return event

    async def send_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        for event, body in batch:
            await self.send(event, body)
        return [event for event, _ in batch]

    async def _send(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        if self._lost_error is not None:
            raise self._lost_error
        if headers is not None:
            # nats-py checks only the body against max_payload; the server counts
            # the headers too, and would close the connection.
            size = len(data) + headers_size(headers)
            if size > self._conn.message_limit():
                limit = self._conn.message_limit()
                raise too_big(subject, size, limit, "the NATS server's max_payload")
        try:
            await self._conn.nc.publish(subject, data, headers=headers)
        except Exception as exc:
            # Imported here, off the happy path: an import statement per
            # publish costs ~1 us, a tenth of our overhead over nats-py.
            raise self._publish_error(exc, subject, data) from None

    def _publish_error(self, exc: Exception, subject: str, data: bytes) -> Exception:
        from nats.errors import ConnectionClosedError, MaxPayloadError, OutboundBufferLimitError

        if isinstance(exc, OutboundBufferLimitError):
            return PublishError(
                f"{self.name}: not connected and the outbound buffer is full; event on "
                f"{subject!r} not published (raise pending_size= or retry later)"
            )
        if isinstance(exc, MaxPayloadError):
            # Only with headers that JSON escapes, or after a reconnect to a
            # server with a smaller max_payload: payloads are held below it.
            return too_big(
                subject, len(data), self._conn.message_limit(), "the NATS server's max_payload"
            )
        if isinstance(exc, ConnectionClosedError):
            return self._conn.lost_error()
        return exc

    # -- subscribing -------------------------------------------------------

    def make_subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        return NatsSubscription(self, pattern, consumer=consumer, start=start, buffer=buffer)

    async def _attach(self, sub: NatsSubscription) -> None:
        if self._lost_error is not None:
            raise self._lost_error
        async with self._lock:
            group = self._groups.get(sub.pattern.text)
            if group is None:
                group = _PatternGroup(sub.pattern)
                nc = self._conn.nc
                with self._conn.translate(f"subscribing to {sub.pattern.text!r}"):
                    group.nats_sub = await nc.subscribe(
                        to_subject(self.prefix, sub.pattern.text),
                        cb=self._callback(group),
                        pending_msgs_limit=self.options.pending_limit,
                    )
                    try:
                        # Once the server answers the PING, it has the SUB. It
                        # may not route another connection's publish to it for a
                        # moment yet (nats-server 2.9.10: ~10% of publishes sent
                        # right after were lost), so wait that moment out.
                        await nc.flush()
                        await asyncio.sleep(SUB_SETTLE)
                    except BaseException:
                        await group.nats_sub.unsubscribe()
                        raise
                self._groups[sub.pattern.text] = group
                self._by_nats_sub[id(group.nats_sub)] = group
            group.subs.append(sub)

    async def _detach(self, sub: NatsSubscription) -> None:
        async with self._lock:
            group = self._groups.get(sub.pattern.text)
            if group is None or sub not in group.subs:
                return
            group.subs.remove(sub)
            if group.subs:
                return
            del self._groups[sub.pattern.text]
            nats_sub = group.nats_sub
            if nats_sub is not None:
                self._by_nats_sub.pop(id(nats_sub), None)
                client = self._conn.client
                if client is not None and not client.is_closed:
                    await nats_sub.unsubscribe()

    def _callback(self, group: _PatternGroup) -> Callable[[Msg], Awaitable[None]]:
        matches = group.pattern.matches
        report = self.report_malformed
        prefix = self.prefix
        foreign = self.options.foreign

        async def on_message(msg: Msg) -> None:
            topic = to_topic(prefix, msg.subject)
            if topic is None:
                for sub in group.subs:
                    report(sub, "subject", f"{msg.subject!r} is not a topic's subject")
                return
            if not matches(topic):
                # Dead letters (a JetStream stream on our prefix) reach '>' too:
                # only patterns naming 'dead' first match them.
                return
            try:
                event = decode(msg.data, msg.headers, topic)
                if event is None:
                    if foreign != "adopt":
                        # No dead letters on nats://: foreign=dead_letter drops too.
                        for sub in group.subs:
                            report(sub, "foreign", f"a foreign message on {msg.subject!r}")
                        return
                    seed = f"{msg.subject}/{hashlib.sha256(msg.data).hexdigest()}"
                    event = adopt(msg.data, topic, seed=seed)
            except PayloadError as exc:
                for sub in group.subs:
                    report(sub, "envelope", f"on {msg.subject!r}: {exc}")
                return
            for sub in group.subs:
                sub.push(event)

        return on_message

    # -- connection events -------------------------------------------------

    def _slow_consumer(self, nats_sub: object) -> None:
        group = self._by_nats_sub.get(id(nats_sub))
        if group is not None:
            for sub in group.subs:
                sub.stats.dropped += 1

    def _reconnected(self) -> None:
        # The server may have come back with another max_payload.
        self.max_payload_bytes = self._conn.payload_limit(nats_headers=0)
        for sub in self._subscriptions:
            sub.stats.reconnects += 1

    def _lost(self, error: ConnectionLost) -> None:
        self._lost_error = error
        for sub in list(self._subscriptions):
            sub.fail(error)
            sub.finish()

    # -- closing -----------------------------------------------------------

    async def disconnect(self) -> None:
        await self._conn.close()


def from_url(url: str, settings: Settings | None = None) -> NatsTransport:
    """Build a NATS core transport from ``nats://`` or ``tls://``."""
    parsed = parse_url(url)
    options = parse_options(NatsOptions, parsed, settings)
    check_positive(
        options,
        parsed,
        "connect_timeout",
        "reconnect_wait",
        "reconnect_timeout",
        "pending_size",
        "pending_limit",
    )
    return NatsTransport(parsed, options, settings)
