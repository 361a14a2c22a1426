"""Composite transport: a fast local leg plus one or more targets.

Features
    Publish writes to every target first (so the event is persisted / on its
    way to other nodes), then delivers on the local leg. If a target fails,
    :class:`PublishError` names the legs that succeeded and the event is not
    delivered locally. A live subscription listens on the local leg and on
    every target; events that come back from a target carrying this
    composite's ``origin`` were already delivered locally and are dropped,
    and an id seen recently is not delivered twice, so each subscriber gets
    each event once. Durable subscriptions (``consumer=``) go to the first
    target that declares ``consumer_offsets``.

Connection String
    A list of URLs, local leg first:
    ``["memory://", "honker+durable:///app.db"]`` or, in the environment,
    ``ALKPUBSUB_URL='["memory://", "honker+durable:///app.db"]'``.

Transport Options
    none of its own; each leg reads its own URL.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from dataclasses import fields

from alkpubsub.abilities import DEFAULT_MAX_DELIVERIES, Forwarding, max_deliveries_of
from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.config import Settings
from alkpubsub.errors import ConfigError, PublishError, PubSubError
from alkpubsub.event import Event
from alkpubsub.transport import BaseTransport, Subscription, Transport

RECENT_IDS = 4096
"""How many recent event ids each subscription remembers to drop duplicates."""


def _combine(local: Capabilities, targets: Sequence[Capabilities]) -> Capabilities:
    """Live features need every leg; durable ones come from the durable target."""
    durable = next((t for t in targets if t.consumer_offsets), None)
    values: dict[str, bool] = {}
    for f in fields(Capabilities):
        name = f.name
        if name in ("wildcards", "ordered"):
            values[name] = getattr(local, name) and all(getattr(t, name) for t in targets)
        elif name in ("cross_process", "cross_node", "persistent"):
            values[name] = any(getattr(t, name) for t in targets)
        else:
            values[name] = bool(durable and getattr(durable, name))
    return Capabilities(**values)


class CompositeSubscription(Subscription):
    """Merges the legs' live subscriptions, dropping echoes and duplicates."""

    transport: CompositeTransport

    def __init__(self, transport: CompositeTransport, pattern: str, *, buffer: int) -> None:
        super().__init__(transport, pattern, buffer=buffer)
        self._legs: list[Subscription] = []
        self._pumps: list[asyncio.Task[None]] = []
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()

    async def on_start(self) -> None:
        composite = self.transport
        for index, leg in enumerate((composite.local, *composite.targets)):
            sub = leg.subscribe(self.pattern.text, buffer=self.buffer_size)
            await sub.start()
            self._legs.append(sub)
            self._pumps.append(asyncio.create_task(self._pump(sub, echo_ok=index == 0)))

    async def _pump(self, leg: Subscription, *, echo_ok: bool) -> None:
        origin = self.transport.origin
        try:
            async for event in leg:
                if not echo_ok and event.origin == origin:
                    continue  # published here: the local leg delivered it already
                if event.id in self._recent:
                    continue
                self._recent[event.id] = None
                if len(self._recent) > RECENT_IDS:
                    self._recent.popitem(last=False)
                self.push(event)
        except PubSubError as exc:
            self.fail(exc)

    async def on_close(self) -> None:
        for task in self._pumps:
            task.cancel()
        for sub in self._legs:
            await sub.close()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    @property
    def legs(self) -> list[Subscription]:
        """The per-leg subscriptions (for their stats)."""
        return list(self._legs)


class CompositeTransport(BaseTransport):
    """``CompositeTransport(local, *targets)``; see the module docstring."""

    def __init__(self, local: Transport, *targets: Transport, origin: str | None = None) -> None:
        if not targets:
            raise ConfigError("a composite needs a local leg and at least one target")
        super().__init__(origin=origin)
        self.local = local
        self.targets = targets
        self.name = "composite(" + ", ".join(t.name for t in (local, *targets)) + ")"
        self.capabilities = _combine(local.capabilities, [t.capabilities for t in targets])
        self._durable = next((t for t in targets if t.capabilities.consumer_offsets), None)

    async def send(self, event: Event, body: bytes) -> Event:
        await self._to_targets([event])
        await _forward(self.local, event)
        return event

    async def send_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        events = [event for event, _ in batch]
        await self._to_targets(events)
        for event in events:
            await _forward(self.local, event)
        return events

    async def _to_targets(self, events: list[Event]) -> None:
        results = await asyncio.gather(
            *(_forward_all(t, events) for t in self.targets), return_exceptions=True
        )
        failed = [(t, r) for t, r in zip(self.targets, results, strict=True) if r is not None]
        if failed:
            ok = tuple(t.name for t, r in zip(self.targets, results, strict=True) if r is None)
            names = ", ".join(f"{t.name} ({type(r).__name__}: {r})" for t, r in failed)
            raise PublishError(
                f"publish to {events[0].topic!r} failed on {names}; "
                f"succeeded on {list(ok) or 'none'}; not delivered locally — retry the publish",
                succeeded=ok,
            ) from next(r for _, r in failed if isinstance(r, BaseException))

    def make_subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        if consumer is not None or start != "new":
            assert self._durable is not None  # the base checked the capabilities
            return self._durable.subscribe(pattern, consumer=consumer, start=start, buffer=buffer)
        return CompositeSubscription(self, pattern, buffer=buffer)

    @property
    def max_payload_bytes(self) -> int:
        """The smallest limit of any leg: an event must fit on all of them."""
        return min(leg.max_payload_bytes for leg in (self.local, *self.targets))

    @max_payload_bytes.setter
    def max_payload_bytes(self, value: int) -> None:
        # The legs' limits decide; BaseTransport's default is ignored here.
        pass

    @property
    def max_deliveries(self) -> int:
        """The durable target's dead-letter threshold."""
        limit = max_deliveries_of(self._durable)
        return DEFAULT_MAX_DELIVERIES if limit is None else limit

    async def disconnect(self) -> None:
        for leg in (self.local, *self.targets):
            await leg.close()


async def _forward(transport: Transport, event: Event) -> None:
    if not isinstance(transport, Forwarding):
        raise ConfigError(f"{transport.name} cannot be a composite leg: it has no forward()")
    await transport.forward(event)


async def _forward_all(transport: Transport, events: list[Event]) -> None:
    for event in events:
        await _forward(transport, event)


async def open_composite(urls: Sequence[str], settings: Settings) -> CompositeTransport:
    """Open every leg of ``urls`` (local first) and combine them."""
    from alkpubsub.registry import open_transport

    if len(urls) < 2:
        raise ConfigError(f"a composite needs at least two URLs, got {list(urls)!r}")
    legs: list[Transport] = []
    try:
        for url in urls:
            legs.append(await open_transport(url, settings))
    except BaseException:
        for leg in legs:
            await leg.close()
        raise
    return CompositeTransport(legs[0], *legs[1:], origin=settings.origin)
