"""Redis pub/sub transport: live events between processes and machines.

Features
    persistent: no   replay: no   ordered: yes   wildcards: yes
    cross_process: yes   cross_node: yes   competing consumers: no   dead letter: no
    A topic is a Redis channel (``prefix`` + topic). Exact patterns SUBSCRIBE to
    their channel; wildcard patterns PSUBSCRIBE to their literal prefix + ``*``
    (Redis globs cross ``:``) and every message is matched again client-side, so
    ``*`` and ``>`` mean exactly what they mean on every transport. One pub/sub
    connection serves all subscriptions of a transport; the server is told on a
    pattern's first subscriber and untold on its last. ``__aenter__`` returns
    once the server has confirmed the subscription, so anything published
    afterwards is delivered.

    When the connection drops (a broker restart), a reader reconnects with
    backoff (50 ms doubling to 1 s) and resubscribes; every open subscription
    counts ``stats.reconnects``. Events published while it was down are lost
    (pub/sub keeps nothing). If the server stays away longer than
    ``reconnect_timeout``, iterators raise :class:`ConnectionLost` after their
    buffered events. A publish retries twice within ~1 s, then raises
    :class:`ConnectionLost`; a retried publish may, rarely, arrive twice (when
    the server took it but its reply was lost).

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
    reconnect_timeout = 30.0      seconds an outage may last before subscriptions fail
    connect_timeout = 5.0         seconds to open a TCP connection
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from pydantic import Field

from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.config import Settings, TransportOptions, parse_options, parse_url
from alkpubsub.errors import ConnectionLost, PayloadError
from alkpubsub.event import Event
from alkpubsub.routing import Router
from alkpubsub.topics import Pattern
from alkpubsub.transport import BaseTransport, Subscription

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

log = logging.getLogger("alkpubsub.redis")

# How long one read waits before the loop looks around (closing, health check).
_POLL = 1.0
_HEALTH_CHECK = 10.0

# A server-side subscription: (b"s", channel) for SUBSCRIBE, (b"p", glob) for PSUBSCRIBE.
Key = tuple[bytes, bytes]


class RedisOptions(TransportOptions):
    """Options of ``redis://`` URLs (see the module docstring)."""

    prefix: str = Field("", pattern=r"^[A-Za-z0-9_.:\-]*$", max_length=128)
    reconnect_timeout: float = Field(30.0, ge=0)
    connect_timeout: float = Field(5.0, gt=0)


class RedisSubscription(Subscription):
    """A live subscription on the transport's shared pub/sub connection."""

    transport: RedisTransport

    async def _open(self) -> None:
        await self.transport._attach(self)

    async def _shutdown(self) -> None:
        await self.transport._detach(self)


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
        self._client = target.client(retries=2, connect_timeout=options.connect_timeout)
        self._listener = target.client(
            retries=0,
            connect_timeout=options.connect_timeout,
            health_check_interval=_HEALTH_CHECK,
        )
        self._pubsub = self._listener.pubsub()
        self._routes: dict[Key, Router[RedisSubscription]] = {}
        self._live: set[Key] = set()  # confirmed by the server on the current connection
        self._waiters: dict[Key, list[asyncio.Future[None]]] = {}
        self._attached: set[RedisSubscription] = set()
        self._reader: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
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

    async def _publish(self, event: Event, body: bytes) -> Event:
        try:
            await self._client.execute_command(  # type: ignore[no-untyped-call]
                b"PUBLISH", self._prefix + event.topic.encode(), event.envelope(body)
            )
        except CONNECTION_ERRORS as exc:
            raise translate(exc, self.target, f"publishing to {event.topic!r}") from None
        return event

    async def _publish_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        pipe = self._client.pipeline(transaction=False)
        command, prefix = pipe.execute_command, self._prefix
        for event, body in batch:
            command(b"PUBLISH", prefix + event.topic.encode(), event.envelope(body))
        try:
            await pipe.execute()
        except CONNECTION_ERRORS as exc:
            raise translate(exc, self.target, f"publishing {len(batch)} events") from None
        return [event for event, _ in batch]

    # -- subscribing -------------------------------------------------------

    def _subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        return RedisSubscription(self, pattern, consumer=consumer, start=start, buffer=buffer)

    def _key(self, pattern: Pattern) -> Key:
        if pattern.exact:
            return (b"s", self._prefix + pattern.text.encode())
        literal = "".join(f"{segment}:" for segment in pattern.literal_prefix)
        return (b"p", self._prefix + literal.encode() + b"*")

    async def _attach(self, sub: RedisSubscription) -> None:
        await self._ensure_reader()
        key = self._key(sub.pattern)
        router = self._routes.get(key)
        first = router is None
        if router is None:
            router = self._routes[key] = Router()
        router.add(sub)
        self._attached.add(sub)
        if key in self._live:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(waiter)
        try:
            if first and self._up.is_set():
                await self._send(key, subscribe=True)
            # While reconnecting, the reader subscribes every routed key.
            async with asyncio.timeout(self.options.reconnect_timeout + 5):
                await waiter
        except BaseException as exc:
            await self._detach(sub)
            if isinstance(exc, TimeoutError | ConnectionLost):
                raise ConnectionLost(
                    f"{self.name} did not confirm the subscription to {sub.pattern.text!r}; "
                    "is the server up?"
                ) from None
            raise

    async def _detach(self, sub: RedisSubscription) -> None:
        self._attached.discard(sub)
        key = self._key(sub.pattern)
        router = self._routes.get(key)
        if router is None:
            return
        router.remove(sub)
        if router:
            return
        del self._routes[key]
        self._live.discard(key)
        if self._up.is_set():
            # On failure the reader resubscribes only routed keys after reconnecting.
            with contextlib.suppress(ConnectionLost):
                await self._send(key, subscribe=False)

    async def _send(self, key: Key, *, subscribe: bool) -> None:
        kind, name = key
        ps = self._pubsub
        try:
            if kind == b"s":
                await (ps.subscribe(name) if subscribe else ps.unsubscribe(name))
            else:
                await (ps.psubscribe(name) if subscribe else ps.punsubscribe(name))
        except CONNECTION_ERRORS as exc:
            # The reader sees the broken connection too and recovers it.
            self._up.clear()
            raise translate(exc, self.target, "subscribing") from None

    async def _ensure_reader(self) -> None:
        if self._reader is not None:
            return
        try:
            await self._pubsub.connect()  # type: ignore[no-untyped-call]
        except Exception as exc:
            if isinstance(exc, CONNECTION_ERRORS) or is_auth_error(exc):
                raise translate(exc, self.target, "opening the pub/sub connection") from None
            raise
        if self._reader is None:
            self._up.set()
            self._reader = asyncio.create_task(self._read(), name=f"alkpubsub {self.name} reader")
            self._reader.add_done_callback(self._reader_done)

    def _reader_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("%s: the pub/sub reader failed", self.name, exc_info=task.exception())
        self._fail_all(task.exception())

    # -- the reader --------------------------------------------------------

    async def _read(self) -> None:
        ps = self._pubsub
        backoff = Backoff(self.options.reconnect_timeout)
        while True:
            conn = ps.connection
            if conn is None or not conn.is_connected or not self._up.is_set():
                if not await self._recover(backoff, None):
                    return
                continue
            buffered = getattr(conn, "_socket_is_empty", None)
            # A frame already (partly) in the socket buffer is read without a
            # timer: asyncio.timeout per message cost ~3.5 us (a fifth of our
            # overhead over redis-py in bursts), and a timer expiring mid-frame
            # would desync the stream anyway. An idle wait keeps the poll, so
            # closing and the health check still come round every _POLL.
            timeout = None if buffered is not None and not buffered() else _POLL
            try:
                message = await ps.get_message(timeout=timeout)
            except CONNECTION_ERRORS as exc:
                if not await self._recover(backoff, exc):
                    return
                continue
            if message is not None:
                self._dispatch(message)

    async def _recover(self, backoff: Backoff, error: BaseException | None) -> bool:
        """Reconnect and resubscribe; False when the outage outlasted ``reconnect_timeout``."""
        self._up.clear()
        self._live.clear()
        if not backoff.down:
            log.warning("%s: connection lost (%s); reconnecting", self.name, error)
        ps = self._pubsub
        while True:
            if not backoff.failed():
                self._fail_all(error)
                return False
            await backoff.pause()
            if ps.connection is not None:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await ps.connection.disconnect(nowait=True)
            # redis-py resubscribes what these hold when the connection comes back.
            ps.channels = {k[1]: None for k in self._routes if k[0] == b"s"}
            ps.patterns = {k[1]: None for k in self._routes if k[0] == b"p"}
            try:
                await ps.connect()  # type: ignore[no-untyped-call]
            except CONNECTION_ERRORS as exc:
                error = exc
                continue
            except Exception as exc:
                if not is_auth_error(exc):
                    raise
                error = exc
                continue
            try:
                await self._sync()
            except ConnectionLost as exc:
                error = exc
                continue
            break
        backoff.recovered()
        self._up.set()
        log.warning("%s: reconnected; events published meanwhile were not received", self.name)
        for sub in self._attached:
            sub.stats.reconnects += 1
        return True

    async def _sync(self) -> None:
        """Subscribe keys routed while reconnecting; drop keys unrouted meanwhile."""
        ps = self._pubsub
        for key in list(self._routes):
            held = ps.channels if key[0] == b"s" else ps.patterns
            if key[1] not in held:
                await self._send(key, subscribe=True)
        for kind, held in ((b"s", dict(ps.channels)), (b"p", dict(ps.patterns))):
            for name in held:
                if (kind, name) not in self._routes:
                    await self._send((kind, name), subscribe=False)

    def _fail_all(self, error: BaseException | None) -> None:
        failure = ConnectionLost(
            f"{self.name} was unreachable for more than {self.options.reconnect_timeout:g} s "
            f"(last error: {type(error).__name__ if error else 'none'}); subscribe again later"
        )
        log.error("%s: giving up after %gs", self.name, self.options.reconnect_timeout)
        for sub in self._attached:
            sub._fail(failure)
            sub._finish()
            self._forget(sub)
        self._attached.clear()
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(failure)
        self._waiters.clear()
        self._routes.clear()
        self._pubsub.channels = {}
        self._pubsub.patterns = {}
        self._reader = None

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "message" or kind == "pmessage":
            if kind == "message":
                router = self._routes.get((b"s", message["channel"]))
            else:
                router = self._routes.get((b"p", message["pattern"]))
            if router is None:
                return  # unsubscribed a moment ago
            channel: bytes = message["channel"]
            topic = channel[len(self._prefix) :].decode(errors="replace")
            subs = router.match(topic)
            if not subs:
                return
            try:
                event = Event.from_json(message["data"])
            except PayloadError as exc:
                for sub in subs:
                    self.report_malformed(sub, "envelope", f"on channel {topic!r}: {exc}")
                return
            if event.topic != topic:
                for sub in subs:
                    self.report_malformed(
                        sub, "topic", f"event for {event.topic!r} arrived on channel {topic!r}"
                    )
                return
            for sub in subs:
                sub._push(event)
        elif kind == "subscribe" or kind == "psubscribe":
            key = (b"s" if kind == "subscribe" else b"p", message["channel"])
            if key in self._routes:
                self._live.add(key)
            for waiter in self._waiters.pop(key, ()):
                if not waiter.done():
                    waiter.set_result(None)

    # -- closing -----------------------------------------------------------

    async def _close(self) -> None:
        if self._reader is not None:
            await stop_tasks([self._reader])
            self._reader = None
        try:
            async with asyncio.timeout(2.0):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        except CONNECTION_ERRORS:
            pass
        await close_client(self._listener)
        await close_client(self._client)


def from_url(url: str, settings: Settings | None = None) -> RedisTransport:
    """Build a Redis pub/sub transport from ``redis://`` or ``rediss://``."""
    parsed = parse_url(url)
    options = parse_options(RedisOptions, parsed, settings)
    target = redis_target(parsed, settings)
    return RedisTransport(target, options, origin=settings.origin if settings else None)
