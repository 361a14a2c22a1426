"""Redis pub/sub transport: live events between processes and machines.

Features
    persistent: no   replay: no   ordered: yes   wildcards: yes
    cross_process: yes   cross_node: yes   competing consumers: no   dead letter: no
    A topic is a Redis channel (``prefix`` + topic). Exact patterns SUBSCRIBE to
    their channel; wildcard patterns PSUBSCRIBE to their literal prefix + ``*``
    (Redis globs cross ``:``) and every message is matched again client-side, so
    ``*`` and ``>`` mean exactly what they mean on every transport. One pub/sub
    connection serves all subscriptions of a transport and holds the smallest
    set of channels and globs that covers them (a channel under a held glob is
    not subscribed too), so each message crosses it once. ``__aenter__``
    returns once the server holds a covering subscription, however many enter
    at once, so anything published afterwards is delivered.

    The connection is read as fast as it arrives, whatever the application
    does: events go into each subscription's bounded buffer, dropping the
    oldest (``stats.dropped``). That keeps Redis from cutting the subscriber
    off at its 32 MB pub/sub output-buffer limit under bursts of large
    messages from ordinary publishers; a publisher pipelining faster than this
    process runs can still pass it (then it reconnects, as below).

    When the connection drops (a broker restart), it reconnects (the first try
    at once, then every 10-20 ms for 5 s, then doubling to 200 ms) and
    resubscribes. Events published from the drop until a subscription is
    confirmed again are lost (pub/sub keeps nothing): each subscription counts
    ``stats.reconnects`` and the time it was not live in ``stats.offline_ms``,
    and one warning gives the gap (measured: 0-2 of 200 publishes/s lost per
    restart). If the server stays away longer than ``reconnect_timeout``,
    iterators raise :class:`ConnectionLost` after their buffered events.
    A message is an envelope, or a structured CloudEvent (a JSON object with
    ``specversion``); pub/sub has no headers, so no binary CloudEvents. Any
    other JSON or UTF-8 text is *foreign*: with ``foreign=adopt`` it becomes
    an event of the channel's topic (payload = the JSON, or the text beyond
    the publish limits; id ``uuid5`` of channel and body; origin ``foreign``;
    header ``x-alk-foreign: json|text``); ``foreign=drop`` counts it in
    ``stats.malformed``. Malformed messages (not UTF-8, an ``alkpubsub`` key
    without a valid envelope, an envelope or CloudEvent naming another topic
    than its channel's) are counted in ``stats.malformed`` and dropped.

    A publish retries twice within ~1 s, then raises :class:`ConnectionLost`;
    a retried publish may, rarely, arrive twice (when the server took it but
    its reply was lost).

    Forwarding (``forward``, ``forward_many``: the outbox relay, a composite
    leg) deduplicates by event id within ``dedupe_window`` seconds: an id
    forwarded again to the same channel is not published again and is
    reported ``duplicate``, across relay crashes and restarts and between
    concurrent relays (an atomic Lua script per event sets the key
    ``alkpubsub:dedupe:<channel>:<event id>`` and publishes; a batch is one
    pipelined round trip). The keys live in the URL's database (channels do
    not), expire with the window and cost ~200 bytes per event in it
    (``_redis_dedupe.py``). ``publish`` never pays for it. Redis Cluster is
    not supported.

    Pub/sub channels are global to a Redis server: the database number does
    not separate them. Give applications that share a server their own
    ``prefix``.

Connection String
    ``redis://[[user]:password@]host[:6379][/db]``     plain TCP
    ``rediss://[[user]:password@]host[:6379][/db]``    TLS; CA, certificate and
    key files come from ``Settings.tls_ca`` / ``tls_cert`` / ``tls_key``.
    Credentials in the URL win over ``Settings.username`` / ``password``.

Transport Options
    prefix = ""                   channel name prefix (``[A-Za-z0-9_.:-]*``)
    format = "alkpubsub"          what PUBLISH writes: ``alkpubsub`` (the envelope) or
                                  ``cloudevents`` (structured); ``cloudevents-binary`` is a
                                  ConfigError (no headers: use redis+durable://)
    foreign = "adopt"             messages of other writers: ``adopt`` or ``drop``
                                  (``dead_letter`` is a ConfigError: no dead letters here)
    reconnect_timeout = 30.0      seconds an outage may last before subscriptions fail
    connect_timeout = 5.0         seconds to open a TCP connection
    dedupe_window = 120.0         seconds a forwarded event id is remembered (0 = forward
                                  without dedupe; at most 30 days)
"""

from __future__ import annotations

import asyncio
import logging
import time

from pydantic import Field, field_validator
from redis import exceptions as rex

from alkpubsub.abilities import Forwarded
from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.cloudevents import to_structured
from alkpubsub.config import Settings, TransportOptions, parse_options, parse_url
from alkpubsub.errors import Closed, ConnectionLost, InvalidTopic, PayloadError
from alkpubsub.event import Event
from alkpubsub.routing import Router
from alkpubsub.topics import validate_topic
from alkpubsub.transport import BaseTransport, Subscription

from ._redis_channels import PAT, SUB, ChannelPlan, Key, Wait, Waiting, commands, natural_key
from ._redis_common import (
    CONNECTION_ERRORS,
    Backoff,
    RedisTarget,
    close_client,
    is_auth_error,
    redis_target,
    stop_tasks,
    translate,
)
from ._redis_decode import channel_seed, decode_body
from ._redis_dedupe import MAX_WINDOW, PUBLISH_SCRIPT, DedupeScript, forward_one
from ._redis_wire import Frame, PubSubWire, open_wire, pack

log = logging.getLogger("alkpubsub.redis")

# With no frame for this long the connection is PINGed; with none for twice
# as long it is dropped and reconnected (a silent peer: a dead host, a pause).
_HEALTH_CHECK = 10.0
_RETRY_CAP = 0.2  # s between reconnect attempts after the first 5 s (events are lost meanwhile)
_CONFIRMATIONS = (b"subscribe", b"psubscribe", b"unsubscribe", b"punsubscribe")


class RedisOptions(TransportOptions):
    """Options of ``redis://`` URLs (see the module docstring)."""

    prefix: str = Field("", pattern=r"^[A-Za-z0-9_.:\-]*$", max_length=128)
    format: str = "alkpubsub"
    foreign: str = "adopt"
    reconnect_timeout: float = Field(30.0, ge=0)
    connect_timeout: float = Field(5.0, gt=0)
    dedupe_window: float = Field(120.0, ge=0, le=MAX_WINDOW)

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value == "cloudevents-binary":
            raise ValueError(
                "format=cloudevents-binary needs message headers, which Redis pub/sub "
                "messages do not have; use format=cloudevents (structured) here, or "
                "redis+durable:// (Streams fields) for binary mode"
            )
        if value not in ("alkpubsub", "cloudevents"):
            raise ValueError(f"format={value!r}: use alkpubsub or cloudevents")
        return value

    @field_validator("foreign")
    @classmethod
    def _foreign(cls, value: str) -> str:
        if value == "dead_letter":
            raise ValueError(
                "foreign=dead_letter: redis:// pub/sub has no dead letters; "
                "use foreign=adopt or foreign=drop, or redis+durable://"
            )
        if value not in ("adopt", "drop"):
            raise ValueError(f"foreign={value!r}: use adopt or drop")
        return value


class RedisSubscription(Subscription):
    """A live subscription on the transport's shared pub/sub connection."""

    transport: RedisTransport

    async def on_start(self) -> None:
        await self.transport._attach(self)

    async def on_close(self) -> None:
        self.transport._detach(self)


class RedisTransport(BaseTransport):
    """Publish/subscribe over Redis channels."""

    capabilities = Capabilities(ordered=True, cross_process=True, cross_node=True, wildcards=True)

    def __init__(
        self, target: RedisTarget, options: RedisOptions, *, origin: str | None = None
    ) -> None:
        super().__init__(origin=origin)
        self.name = target.label
        self.target = target
        self.options = options
        self._prefix = options.prefix.encode()
        self._cloudevents = options.format == "cloudevents"
        self._adopt = options.foreign == "adopt"
        self._client = target.client(retries=2, connect_timeout=options.connect_timeout)
        self._dedupe: DedupeScript | None = None
        if options.dedupe_window > 0:
            self._dedupe = DedupeScript(PUBLISH_SCRIPT, target, options.dedupe_window, b"")
        self._plan = ChannelPlan(self._prefix)
        self._router: Router[RedisSubscription] = Router()
        self._attached: dict[RedisSubscription, Key] = {}
        self._waiting: Waiting[RedisSubscription] = Waiting()
        self._wire: PubSubWire | None = None  # None while reconnecting
        self._keeper: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()
        self._outage: float | None = None  # when the connection dropped, until all are live
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

    # -- publishing --------------------------------------------------------

    # Commands go out as bytes through execute_command: redis-py's publish()
    # wrapper and its str encoding cost ~1 us per event in a pipeline of 500.

    def message(self, event: Event, body: bytes) -> bytes:
        """The message ``event`` is published as, in ``format``."""
        if self._cloudevents:
            return to_structured(event, body)
        return event.envelope(body)

    async def send(self, event: Event, body: bytes) -> Event:
        try:
            await self._client.execute_command(  # type: ignore[no-untyped-call]
                b"PUBLISH", self._prefix + event.topic.encode(), self.message(event, body)
            )
        except CONNECTION_ERRORS as exc:
            raise translate(exc, self.target, f"publishing to {event.topic!r}") from None
        return event

    async def send_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        pipe = self._client.pipeline(transaction=False)
        command, prefix, message = pipe.execute_command, self._prefix, self.message
        for event, body in batch:
            command(b"PUBLISH", prefix + event.topic.encode(), message(event, body))
        try:
            await pipe.execute()
        except CONNECTION_ERRORS as exc:
            raise translate(exc, self.target, f"publishing {len(batch)} events") from None
        return [event for event, _ in batch]

    async def forward(self, event: Event) -> Event:
        """Publish an existing event unchanged, unless its id was forwarded to
        its channel within ``dedupe_window``."""
        if self._dedupe is None:
            return await super().forward(event)
        return await forward_one(self, event)

    async def forward_batch(self, batch: list[tuple[Event, bytes]]) -> list[Forwarded]:
        """Publish the events in one pipelined round trip, in order, each unless
        its id was forwarded to its channel within ``dedupe_window``."""
        dedupe = self._dedupe
        if dedupe is None:
            return await super().forward_batch(batch)
        prefix, key, message = self._prefix, dedupe.key, self.message
        items = []
        for event, body in batch:
            channel = prefix + event.topic.encode()
            items.append((key(event.id, channel + b":"), (channel, message(event, body))))
        sent = await dedupe.run(self._client, items, f"forwarding {len(batch)} events")
        return [
            Forwarded(event, duplicate=not done)
            for (event, _), done in zip(batch, sent, strict=True)
        ]

    # -- subscribing -------------------------------------------------------

    def make_subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        return RedisSubscription(self, pattern, consumer=consumer, start=start, buffer=buffer)

    async def _attach(self, sub: RedisSubscription) -> None:
        await self._ensure_wire()
        if sub.closed:  # closed while the connection opened
            raise Closed(f"subscription to {sub.pattern.text!r} was closed while it started")
        key = natural_key(self._prefix, sub.pattern)
        self._attached[sub] = key
        self._router.add(sub)
        self._plan.add(key)
        entered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.add(sub, Wait(key, entered))
        self._sync()
        if self._wire is not None and self._plan.live(key):
            self._live(sub)  # already held (another subscription's key covers it)
        try:
            # While reconnecting, the keeper subscribes every wanted key.
            async with asyncio.timeout(self.options.reconnect_timeout + 5):
                await entered
        except BaseException as exc:
            self._detach(sub)
            if isinstance(exc, TimeoutError | ConnectionLost):
                raise ConnectionLost(
                    f"{self.name} did not confirm the subscription to {sub.pattern.text!r}; "
                    "is the server up?"
                ) from None
            raise

    def _detach(self, sub: RedisSubscription) -> None:
        wait = self._unwait(sub)
        if wait is not None and wait.entered is not None and not wait.entered.done():
            wait.entered.set_exception(
                Closed(f"subscription to {sub.pattern.text!r} was closed while it started")
            )
        key = self._attached.pop(sub, None)
        if key is None:
            return
        self._router.remove(sub)
        self._plan.remove(key)
        self._sync()

    def _sync(self) -> None:
        """Tell the server what the plan wants (no-op while reconnecting: the
        keeper sends everything once the new connection is up)."""
        wire = self._wire
        if wire is None or not wire.connected:
            return
        add, drop = self._plan.changes()
        if add or drop:
            wire.send(b"".join(pack(*command) for command in commands(add, drop)))

    # -- who is live ---------------------------------------------------------

    def _unwait(self, sub: RedisSubscription) -> Wait | None:
        wait = self._waiting.pop(sub)
        was_down = wait is not None and wait.down_since is not None
        if was_down and not self._waiting.down and self._wire is not None:
            self._outage_over()  # the last dropped subscription is live again
        return wait

    def _live(self, sub: RedisSubscription) -> None:
        """``sub`` is live: its ``__aenter__`` returns, or its gap ends."""
        wait = self._unwait(sub)
        if wait is None:
            return
        if wait.down_since is not None:
            sub.stats.reconnects += 1
            sub.stats.offline_ms += round((time.monotonic() - wait.down_since) * 1000)
        if wait.entered is not None and not wait.entered.done():
            wait.entered.set_result(None)

    def _outage_over(self) -> None:
        if self._outage is None:
            return
        gap, self._outage = time.monotonic() - self._outage, None
        log.warning(
            "%s: resubscribed; subscriptions were not live for %.3f s "
            "(events published meanwhile were not received)",
            self.name,
            gap,
        )

    # -- reading -----------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        if type(frame) is not list:
            if isinstance(frame, rex.ResponseError):
                self._refused(frame)
            return  # PONG
        kind = frame[0]
        if kind == b"message":
            self._deliver((SUB, frame[1]), frame[1], frame[2])
        elif kind == b"pmessage":
            self._deliver((PAT, frame[1]), frame[2], frame[3])
        elif kind in _CONFIRMATIONS:
            key = self._plan.confirmed(kind, frame[1])
            if key is not None and self._waiting:
                for sub, wait in self._waiting.covered_by(key):
                    if self._plan.live(wait.key):
                        self._live(sub)

    def _deliver(self, via: Key, channel: bytes, data: bytes) -> None:
        if not self._plan.deliver(via, channel):
            return  # another held key delivers this message's copy
        try:
            topic = validate_topic(channel[len(self._prefix) :].decode())
        except (UnicodeDecodeError, InvalidTopic):
            self.report_malformed(None, "channel", f"channel {channel!r} is not a topic")
            return
        subs = self._router.match(topic)
        if not subs:
            return
        try:
            decoded = decode_body(data, topic=topic, seed=channel_seed(channel, data))
        except (PayloadError, ValueError, RecursionError) as exc:
            for sub in subs:
                self.report_malformed(sub, "envelope", f"on channel {topic!r}: {exc}")
            return
        if decoded.foreign and not self._adopt:
            for sub in subs:
                self.report_malformed(sub, "foreign", f"on channel {topic!r} (foreign=drop)")
            return
        event = decoded.event
        for sub in subs:
            sub.push(event)

    def _refused(self, error: rex.ResponseError) -> None:
        """An error reply: a (P)SUBSCRIBE was refused (ACL). Fail those entering."""
        log.error("%s: the server refused a subscription: %s", self.name, error)
        failure = translate(error, self.target, "subscribing")
        for wait in self._waiting.entering():
            assert wait.entered is not None
            wait.entered.set_exception(failure)

    # -- keeping the connection --------------------------------------------

    async def _ensure_wire(self) -> None:
        if self._keeper is not None:
            return
        async with self._opening:  # one connection, however many enter at once
            if self._keeper is not None:
                return
            try:
                wire = await open_wire(self.target, self.options.connect_timeout, self._on_frame)
            except Exception as exc:
                if isinstance(exc, CONNECTION_ERRORS) or is_auth_error(exc):
                    raise translate(exc, self.target, "opening the pub/sub connection") from None
                raise
            if self.closed:  # closed while connecting: leave nothing running
                wire.abort()
                raise Closed(f"{self.name} transport is closed; connect again")
            self._use(wire)
            self._keeper = asyncio.create_task(self._keep(wire), name=f"alkpubsub {self.name}")
            self._keeper.add_done_callback(self._keeper_done)

    def _use(self, wire: PubSubWire) -> None:
        self._wire = wire
        self._plan.reset()
        self._sync()

    def _keeper_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("%s: the pub/sub keeper failed", self.name, exc_info=task.exception())
        self._fail_all(task.exception())

    async def _keep(self, wire: PubSubWire | None) -> None:
        while wire is not None:
            wire = await self._reconnect(await self._watch(wire))

    async def _watch(self, wire: PubSubWire) -> BaseException:
        """Wait until ``wire`` is lost (health-checking it meanwhile); the error."""
        seen, pinged = wire.frames, False
        while True:
            try:
                async with asyncio.timeout(_HEALTH_CHECK):
                    error = await asyncio.shield(wire.lost)
                return error or rex.ConnectionError("the server closed the connection")
            except TimeoutError:
                pass
            if wire.frames != seen:
                seen, pinged = wire.frames, False
            elif pinged:
                log.warning("%s: no reply to PING in %gs; reconnecting", self.name, _HEALTH_CHECK)
                wire.abort()
            else:
                wire.send(pack(b"PING"))
                pinged = True

    async def _reconnect(self, error: BaseException) -> PubSubWire | None:
        """Reconnect and resubscribe; None when the outage outlasted ``reconnect_timeout``."""
        self._wire = None
        now = time.monotonic()
        if self._outage is None:
            self._outage = now
        for sub, key in self._attached.items():
            if sub not in self._waiting:
                self._waiting.add(sub, Wait(key, None, now))
        log.warning("%s: connection lost (%s); reconnecting", self.name, error)
        backoff = Backoff(self.options.reconnect_timeout, cap=_RETRY_CAP)
        while True:
            if not backoff.failed():
                self._fail_all(error)
                return None
            await backoff.pause()
            try:
                wire = await open_wire(self.target, self.options.connect_timeout, self._on_frame)
            except Exception as exc:
                if not (isinstance(exc, CONNECTION_ERRORS) or is_auth_error(exc)):
                    raise
                error = exc
                continue
            break
        self._use(wire)
        if not self._waiting.down:
            self._outage_over()
        return wire

    def _fail_all(self, error: BaseException | None) -> None:
        failure = ConnectionLost(
            f"{self.name} was unreachable for more than {self.options.reconnect_timeout:g} s "
            f"(last error: {type(error).__name__ if error else 'none'}); subscribe again later"
        )
        log.error("%s: giving up after %gs", self.name, self.options.reconnect_timeout)
        waits = self._waiting.clear()
        for sub in list(self._attached):
            wait = waits.get(sub)
            if wait is not None and wait.entered is not None and not wait.entered.done():
                wait.entered.set_exception(failure)  # its __aenter__ raises
                continue
            sub.fail(failure)
            sub.finish()
            self.forget(sub)
        self._attached.clear()
        self._outage = None
        self._router = Router()
        self._plan = ChannelPlan(self._prefix)
        self._wire = None
        self._keeper = None  # the next subscription connects afresh

    # -- closing -----------------------------------------------------------

    async def disconnect(self) -> None:
        if self._keeper is not None:
            await stop_tasks([self._keeper])
            self._keeper = None
        if self._wire is not None:
            self._wire.abort()
            self._wire = None
        await close_client(self._client)


def from_url(url: str, settings: Settings | None = None) -> RedisTransport:
    """Build a Redis pub/sub transport from ``redis://`` or ``rediss://``."""
    parsed = parse_url(url)
    options = parse_options(RedisOptions, parsed, settings)
    target = redis_target(parsed, settings)
    return RedisTransport(target, options, origin=settings.origin if settings else None)
