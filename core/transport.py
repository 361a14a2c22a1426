"""The transport contract and the machinery every transport shares.

``Transport`` is the protocol users and the conformance suite program against.
``BaseTransport`` and ``Subscription`` hold what all transports do alike:
argument checks, closing, the bounded per-subscription buffer (drop-oldest for
live events, backpressure for durable ones) and its statistics.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal, Protocol, Self, runtime_checkable

from .capabilities import Capabilities, Start
from .errors import Closed, ConfigError, PayloadError
from .event import Event, encode_payload, new_origin
from .limits import MAX_PAYLOAD_BYTES, check_key
from .limits import check_headers as check_headers
from .topics import Pattern, compile_pattern, validate_topic

log = logging.getLogger("alkpubsub")

DEFAULT_BUFFER = 1024


@dataclass(slots=True)
class SubscriptionStats:
    """Counters of one subscription. ``lag`` is events known to be waiting
    (in the buffer, or in the durable log past the consumer), when known."""

    delivered: int = 0
    acked: int = 0
    nacked: int = 0
    dropped: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    malformed: int = 0
    reconnects: int = 0
    lag: int | None = 0
    offline_ms: int = 0
    """Milliseconds the subscription was not live after it started (reconnects):
    ephemeral transports lose what was published then, durable ones deliver it late."""

    def as_dict(self) -> dict[str, int | None]:
        """A plain dict, for logs and the CLI."""
        return asdict(self)


class Subscription:
    """An async iterator of events for one pattern.

    Use ``async with transport.subscribe(...) as sub:`` (``__aenter__`` returns
    once the subscription is live), then ``async for event in sub``. Transports
    subclass it and fill the buffer with :meth:`_push` (live events; overflow
    drops the oldest) or :meth:`_put` (durable events; a full buffer pauses the
    reader instead of losing anything).
    """

    overflow: ClassVar[Literal["drop_oldest", "pause"]] = "drop_oldest"
    """What a full buffer does: drop the oldest live event (counted in
    ``stats.dropped``), or pause reading until there is room (durable readers:
    nothing is lost). Subclasses that fill the buffer with :meth:`_put` say "pause"."""

    def __init__(
        self,
        transport: BaseTransport,
        pattern: str,
        *,
        consumer: str | None = None,
        start: Start = "new",
        buffer: int = DEFAULT_BUFFER,
    ) -> None:
        self.transport = transport
        self.pattern: Pattern = compile_pattern(pattern)
        self.consumer = consumer
        self.start_at: Start = start
        self.buffer_size = buffer
        self.stats = SubscriptionStats()
        self._buffer: collections.deque[Event] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Make the subscription live. Idempotent; iteration calls it too."""
        if self._closed:
            raise Closed(f"subscription to {self.pattern.text!r} is closed; subscribe again")
        if not self._started:
            self._started = True
            try:
                await self._open()
            except BaseException:
                self._closed = True
                self.transport._forget(self)
                raise

    async def close(self) -> None:
        """End iteration. Durable progress (acked events) is kept; unacked
        events are delivered again to the consumer later."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._wake_space()
        self.transport._forget(self)
        try:
            await self._shutdown()
        finally:
            self._buffer.clear()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran or the transport closed."""
        return self._closed

    async def _open(self) -> None:
        """Transport hook: become live (register with the broker, start readers)."""

    async def _shutdown(self) -> None:
        """Transport hook: stop readers, unregister."""

    # -- iteration ---------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        if not self._started:
            await self.start()
        while True:
            if self._buffer:
                event = self._buffer.popleft()
                self.stats.delivered += 1
                if self._space is not None:
                    self._wake_space()
                return event
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def get(self, timeout: float | None = None) -> Event:
        """The next event, waiting at most ``timeout`` seconds (``TimeoutError``)."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    # -- acknowledgement (durable transports override) ---------------------

    async def ack(self, event: Event) -> None:
        """Mark ``event`` processed. A no-op on ephemeral transports."""
        self.stats.acked += 1

    async def nack(self, event: Event, *, delay: float = 0) -> None:
        """Ask for ``event`` to be delivered again after ``delay`` seconds.
        Ephemeral transports cannot redeliver; there it only counts."""
        self.stats.nacked += 1

    # -- filling the buffer (called by transports on the loop thread) ------

    def _push(self, event: Event) -> None:
        """Add a live event; when the buffer is full, drop the oldest."""
        if self._closed:
            return
        buf = self._buffer
        if len(buf) >= self.buffer_size:
            buf.popleft()
            self.stats.dropped += 1
        buf.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _put(self, event: Event) -> bool:
        """Add a durable event, waiting while the buffer is full. False if closed."""
        while len(self._buffer) >= self.buffer_size and not self._closed:
            self._space = asyncio.get_running_loop().create_future()
            try:
                await self._space
            finally:
                self._space = None
        if self._closed:
            return False
        self._buffer.append(event)
        self._wake()
        return True

    def _fail(self, error: BaseException) -> None:
        """Make the iterator raise ``error`` once the buffered events are consumed."""
        self._error = error
        self._wake()

    def _finish(self) -> None:
        """End iteration after the buffered events (transport closed underneath)."""
        self._closed = True
        self._wake()
        self._wake_space()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_space(self) -> None:
        space = self._space
        if space is not None and not space.done():
            space.set_result(None)

    @property
    def buffered(self) -> int:
        """Events waiting in this subscription's buffer."""
        return len(self._buffer)

    def __repr__(self) -> str:
        consumer = f" consumer={self.consumer!r}" if self.consumer else ""
        state = "closed" if self._closed else "live" if self._started else "new"
        return (
            f"<{type(self).__name__} {self.pattern.text!r}{consumer} {state} on "
            f"{self.transport.name}>"
        )


@runtime_checkable
class Transport(Protocol):
    """What every transport offers. See DESIGN.md "Transport protocol"."""

    name: str
    capabilities: Capabilities
    origin: str
    max_payload_bytes: int

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        key: str | None = None,
    ) -> Event: ...

    async def publish_many(self, items: Iterable[tuple[str, Any]]) -> list[Event]: ...

    def subscribe(
        self,
        pattern: str,
        *,
        consumer: str | None = None,
        start: Start = "new",
        buffer: int = DEFAULT_BUFFER,
    ) -> Subscription: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...


class BaseTransport:
    """Shared behaviour of the built-in transports: checks, bookkeeping, closing.

    Subclasses set ``name`` and ``capabilities``, implement :meth:`_publish`
    (one event, with its payload's JSON text), may override :meth:`_publish_batch`,
    and build their subscriptions in :meth:`_subscription`.
    """

    name: str = "transport"
    capabilities: Capabilities = Capabilities()

    def __init__(self, *, origin: str | None = None) -> None:
        self.origin = origin or new_origin()
        self._max_payload_bytes = MAX_PAYLOAD_BYTES
        self._subscriptions: set[Subscription] = set()
        self._closed = False
        self._malformed_kinds: set[str] = set()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open connections. ``alkpubsub.connect`` calls it; idempotent."""

    @property
    def max_payload_bytes(self) -> int:
        """Largest payload, as JSON bytes, this transport accepts at publish
        (default :data:`alkpubsub.limits.MAX_PAYLOAD_BYTES`). A transport may
        lower it once it knows its broker's own limit; raising it above the
        default is refused, since other transports' readers hold to it."""
        return self._max_payload_bytes

    @max_payload_bytes.setter
    def max_payload_bytes(self, value: int) -> None:
        if type(value) is not int or not 1 <= value <= MAX_PAYLOAD_BYTES:
            raise ConfigError(
                f"max_payload_bytes={value!r} must be an int in 1..{MAX_PAYLOAD_BYTES}"
            )
        self._max_payload_bytes = value

    # -- publishing --------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        key: str | None = None,
    ) -> Event:
        """Publish one event and return it once the transport has accepted it.

        Everything is checked first (topic, payload, headers, key and size; see
        :mod:`alkpubsub.limits`), so nothing is accepted that a reader cannot decode."""
        self._check_open()
        validate_topic(topic)
        if headers:
            headers = check_headers(headers)
        elif headers is not None and not isinstance(headers, dict):
            check_headers(headers)
        if key is not None:
            check_key(key)
        event, body = Event.create(
            topic,
            payload,
            origin=self.origin,
            headers=headers,
            key=key,
            max_bytes=self.max_payload_bytes,
        )
        return await self._publish(event, body)

    async def publish_many(self, items: Iterable[tuple[str, Any]]) -> list[Event]:
        """Publish ``(topic, payload)`` pairs in order, as one batch where the
        transport can. Every item is validated before any is published."""
        self._check_open()
        batch: list[tuple[Event, bytes]] = []
        limit = self.max_payload_bytes
        for index, item in enumerate(_iterate(items)):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise PayloadError(
                    f"publish_many item {index} is {_short(item)}; each item must be a "
                    "(topic, payload) pair: publish headers or keys with publish()"
                )
            topic, payload = item
            validate_topic(topic)
            batch.append(Event.create(topic, payload, origin=self.origin, max_bytes=limit))
        if not batch:
            return []
        return await self._publish_batch(batch)

    async def forward(self, event: Event) -> Event:
        """Publish an existing event unchanged (same id and origin): used by the
        composite and the relay so subscribers can deduplicate by id. The event
        is held to this transport's limits like any publish."""
        self._check_open()
        validate_topic(event.topic)
        body = encode_payload(event.payload, topic=event.topic, max_bytes=self.max_payload_bytes)
        return await self._publish(event, body)

    async def _publish(self, event: Event, body: bytes) -> Event:
        raise NotImplementedError

    async def _publish_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        return [await self._publish(event, body) for event, body in batch]

    # -- subscribing -------------------------------------------------------

    def subscribe(
        self,
        pattern: str,
        *,
        consumer: str | None = None,
        start: Start = "new",
        buffer: int = DEFAULT_BUFFER,
    ) -> Subscription:
        """Subscribe to topics matching ``pattern``. The subscription is live
        once ``async with`` enters (or on first iteration)."""
        self._check_open()
        compile_pattern(pattern)
        caps = self.capabilities
        if not caps.wildcards and ("*" in pattern.split(":") or pattern.endswith(">")):
            raise ConfigError(
                f"{self.name} does not support wildcard patterns ({pattern!r}); "
                "subscribe to each concrete topic"
            )
        if consumer is not None:
            if not caps.consumer_offsets:
                raise ConfigError(
                    f"{self.name} is ephemeral and has no named consumers (consumer={consumer!r}); "
                    "use a durable URL such as honker+durable://, redis+durable:// or "
                    "nats+durable://, or drop consumer="
                )
            check_consumer_name(consumer)
        if start != "new":
            if not caps.replay:
                raise ConfigError(
                    f"{self.name} delivers live events only (start={start!r}); "
                    "use a durable transport to replay, or drop start="
                )
            if not (
                start == "earliest"
                or (isinstance(start, int) and not isinstance(start, bool) and start >= 0)
            ):
                raise ConfigError(
                    f"start={start!r} is not valid; use 'new', 'earliest' or an offset >= 0"
                )
        if not isinstance(buffer, int) or isinstance(buffer, bool) or buffer < 1:
            raise ConfigError(f"buffer={buffer!r} must be a positive int (events)")
        sub = self._subscription(pattern, consumer=consumer, start=start, buffer=buffer)
        self._subscriptions.add(sub)
        return sub

    def _subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        raise NotImplementedError

    def _forget(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    @property
    def subscriptions(self) -> list[Subscription]:
        """The open subscriptions of this transport."""
        return list(self._subscriptions)

    # -- closing -----------------------------------------------------------

    async def close(self) -> None:
        """Close every subscription (their iterators end) and the connections."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.close()
        await self._close()

    async def _close(self) -> None:
        """Transport hook: release connections."""

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"{self.name} transport is closed; connect again")

    def report_malformed(self, sub: Subscription | None, kind: str, detail: str) -> None:
        """Count a message that could not be decoded; log once per kind."""
        if sub is not None:
            sub.stats.malformed += 1
        if kind not in self._malformed_kinds:
            self._malformed_kinds.add(kind)
            log.warning("%s: dropped malformed message (%s): %s", self.name, kind, detail)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.name} {state} subs={len(self._subscriptions)}>"


_CONSUMER = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


def _iterate(items: Any) -> Iterable[Any]:
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
        raise PayloadError(
            f"publish_many takes an iterable of (topic, payload) pairs, not {_short(items)}"
        )
    return items


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def check_consumer_name(consumer: str) -> None:
    """Consumer names follow the topic segment rule, so every broker accepts them."""
    if not isinstance(consumer, str) or not _CONSUMER.fullmatch(consumer):
        raise ConfigError(
            f"consumer={consumer!r} must be 1..128 characters of [A-Za-z0-9_.-]; rename it"
        )
