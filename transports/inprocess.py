"""In-process transport: a bus inside one Python process.

Features
    persistent: no   replay: no   ordered: yes   wildcards: yes
    cross_process: no   competing consumers: no   dead letter: no
    Delivery is synchronous inside ``publish``: when it returns, every matching
    live subscription has the event in its buffer. Buffers are bounded; a full
    buffer drops its oldest event and counts it in ``stats.dropped``, so a slow
    subscriber never blocks the publisher. Use from one event loop.

Connection String
    ``memory://``        a private bus for this transport
    ``memory://NAME``    one bus per NAME in this process, shared by every
                         transport opened with the same URL

Transport Options
    none
"""

from __future__ import annotations

from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.config import ParsedUrl, Settings, TransportOptions, parse_options, parse_url
from alkpubsub.event import Event
from alkpubsub.routing import Router
from alkpubsub.transport import BaseTransport, Subscription


class _Bus:
    """Subscriptions of every transport attached to one named bus."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.router: Router[Subscription] = Router()
        self.users = 0


_buses: dict[str, _Bus] = {}


def _attach(name: str | None) -> _Bus:
    bus = _Bus(None) if name is None else _buses.setdefault(name, _Bus(name))
    bus.users += 1
    return bus


def _detach(bus: _Bus) -> None:
    bus.users -= 1
    if bus.users == 0 and bus.name is not None and _buses.get(bus.name) is bus:
        del _buses[bus.name]


class InProcessSubscription(Subscription):
    """A live subscription on an in-process bus."""

    transport: InProcessTransport

    async def on_start(self) -> None:
        self.transport._bus.router.add(self)

    async def on_close(self) -> None:
        self.transport._bus.router.remove(self)


class InProcessTransport(BaseTransport):
    """Publish/subscribe inside one process, in microseconds."""

    capabilities = Capabilities(ordered=True, wildcards=True)

    def __init__(self, name: str | None = None, *, origin: str | None = None) -> None:
        super().__init__(origin=origin)
        self.name = f"memory://{name}" if name else "memory://"
        self._bus = _attach(name)

    async def send(self, event: Event, body: bytes) -> Event:
        for sub in self._bus.router.match(event.topic):
            sub.push(event)
        return event

    async def send_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        match = self._bus.router.match
        for event, _ in batch:
            for sub in match(event.topic):
                sub.push(event)
        return [event for event, _ in batch]

    def make_subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        return InProcessSubscription(self, pattern, consumer=consumer, start=start, buffer=buffer)

    async def disconnect(self) -> None:
        _detach(self._bus)


class _NoOptions(TransportOptions):
    pass


def from_url(url: str, settings: Settings | None = None) -> InProcessTransport:
    """Build an in-process transport from ``memory://`` or ``memory://NAME``."""
    parsed: ParsedUrl = parse_url(url)
    parse_options(_NoOptions, parsed, settings)
    # The bus name is everything after "memory://", as written (case and "/" kept).
    name = parsed.raw.split("://", 1)[1].split("?", 1)[0] if "://" in parsed.raw else ""
    origin = settings.origin if settings else None
    return InProcessTransport(name or None, origin=origin)
