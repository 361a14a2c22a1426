"""The transport contract and the machinery every transport shares.

``Transport`` is the protocol users and the conformance suite program against.
``BaseTransport`` and ``Subscription`` hold what all transports do alike:
argument checks, closing, the bounded per-subscription buffer (drop-oldest for
live events, backpressure for durable ones) and its statistics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, Self, runtime_checkable

from pydantic_core import to_json

from .abilities import Forwarded
from .capabilities import Capabilities, Start
from .errors import Closed, ConfigError, InvalidTopic, PayloadError
from .event import Event, encode_payload, new_origin
from .limits import MAX_PAYLOAD_BYTES, check_key, check_size
from .limits import check_headers as check_headers
from .subscription import DEFAULT_BUFFER as DEFAULT_BUFFER
from .subscription import Subscription as Subscription
from .subscription import SubscriptionStats as SubscriptionStats
from .topics import compile_pattern, validate_publish_topic, validate_topic

log = logging.getLogger("alkpubsub")


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

    The extension contract (public and typed; see ``conformance/README.md``):
    subclasses set ``name`` and ``capabilities``, implement :meth:`send` (one
    checked event with its payload's JSON text), may override :meth:`send_batch`,
    build their subscriptions in :meth:`make_subscription`, release connections
    in :meth:`disconnect`, and may call :meth:`check_open`, :meth:`forget` and
    :meth:`report_malformed`. Everything a user passes is checked here first.
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
        self.check_open()
        validate_publish_topic(topic)
        if headers:
            check_headers(headers)  # Event.create makes the one copy
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
        return await self.send(event, body)

    async def publish_many(self, items: Iterable[tuple[str, Any]]) -> list[Event]:
        """Publish ``(topic, payload)`` pairs in order, as one batch where the
        transport can. Every item is validated before any is published."""
        self.check_open()
        batch: list[tuple[Event, bytes]] = []
        limit = self.max_payload_bytes
        for index, item in enumerate(_iterate(items)):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise PayloadError(
                    f"publish_many item {index} is {_short(item)}; each item must be a "
                    "(topic, payload) pair: publish headers or keys with publish()"
                )
            topic, payload = item
            validate_publish_topic(topic)
            batch.append(Event.create(topic, payload, origin=self.origin, max_bytes=limit))
        if not batch:
            return []
        return await self.send_batch(batch)

    async def forward(self, event: Event) -> Event:
        """Publish an existing event unchanged (same id and origin): used by the
        composite and the relay so subscribers can deduplicate by id. The event
        is held to this transport's limits like any publish."""
        self.check_open()
        validate_topic(event.topic)
        body = encode_payload(event.payload, topic=event.topic, max_bytes=self.max_payload_bytes)
        return await self.send(event, body)

    async def forward_many(
        self, events: Sequence[Event], *, decoded: bool = False
    ) -> list[Forwarded]:
        """Forward ``events`` unchanged as one batch (:class:`BatchForwarding`):
        an event this transport can never take is returned ``refused`` and the
        rest still go, in order, through :meth:`forward_batch`. ``decoded``:
        every event comes straight from one of this library's readers, which
        held its payload to the publish limits, and nobody changed it since (the
        relay): the payload is encoded and sized for this transport, not walked
        again."""
        self.check_open()
        results: list[Forwarded | None] = []
        batch: list[tuple[Event, bytes]] = []
        limit = self.max_payload_bytes
        # A target with a log of its own sets its offsets; on any other one, the
        # source's offset must not travel with the event.
        strip = not self.capabilities.consumer_offsets
        for event in events:
            if strip and event.offset is not None:
                event = event.with_offset(None)
            try:
                validate_topic(event.topic)
                if decoded:
                    body = _to_json(event.payload, event.topic)
                    check_size(body, limit, topic=event.topic)
                else:
                    body = encode_payload(event.payload, topic=event.topic, max_bytes=limit)
            except (InvalidTopic, PayloadError) as exc:
                results.append(Forwarded(_unplaced(event), refused=exc))
                continue
            results.append(None)
            batch.append((event, body))
        done = iter(await self.forward_batch(batch) if batch else [])
        out: list[Forwarded] = []
        for event, result in zip(events, results, strict=True):
            if result is None:
                result = next(done)
                if result.event is event and event.offset is not None:
                    # The target kept the object: the offset is the source's, not its own.
                    result = Forwarded(_unplaced(event), result.duplicate, result.refused)
            out.append(result)
        return out

    async def forward_batch(self, batch: list[tuple[Event, bytes]]) -> list[Forwarded]:
        """Transport hook for :meth:`forward_many`: send checked events in order
        and say which the broker deduplicated. The default sends them with
        :meth:`send_batch` and reports none as duplicates."""
        return [Forwarded(event) for event in await self.send_batch(batch)]

    async def send(self, event: Event, body: bytes) -> Event:
        """Transport hook: put one already-checked event on the wire (``body`` is
        its payload's JSON, for :meth:`Event.envelope`) and return it once the
        broker accepted it (a durable log's offset set where it has one)."""
        raise NotImplementedError

    async def send_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        """Transport hook: send checked events in order, as one batch where the
        broker can; the default sends them one by one."""
        return [await self.send(event, body) for event, body in batch]

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
        self.check_open()
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
        sub = self.make_subscription(pattern, consumer=consumer, start=start, buffer=buffer)
        self._subscriptions.add(sub)
        return sub

    def make_subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        """Transport hook: a new (not yet started) subscription for checked arguments."""
        raise NotImplementedError

    def forget(self, sub: Subscription) -> None:
        """Stop tracking ``sub`` (it closed, or its transport ended it)."""
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
        await self.disconnect()

    async def disconnect(self) -> None:
        """Transport hook: release connections (subscriptions are already closed)."""

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def check_open(self) -> None:
        """Raise :class:`Closed` once the transport is closed."""
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


def _to_json(payload: Any, topic: str) -> bytes:
    try:
        return to_json(payload)
    except (ValueError, TypeError) as exc:  # PydanticSerializationError is a ValueError
        raise PayloadError(f"payload for topic {topic!r} is not JSON ({exc})") from None


def _unplaced(event: Event) -> Event:
    """``event`` without a log position (the source's is not the target's)."""
    return event if event.offset is None else event.with_offset(None)


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
