"""A transport written outside alkpubsub runs the same suite in a few lines.

``LoopbackTransport`` is what a third party would write: it subclasses the
public ``BaseTransport``/``Subscription``, sends every event through the wire
envelope (encode, then decode on the next loop iteration, as a broker client
would) and registers its own URL scheme.
"""

from __future__ import annotations

import asyncio

import pytest

import alkpubsub
from alkpubsub import BaseTransport, Capabilities, Event, Subscription
from alkpubsub.conformance import TransportFactory, TransportSuite


class LoopbackTransport(BaseTransport):
    name = "loopback"
    capabilities = Capabilities(ordered=True, wildcards=True)

    def __init__(self, peers: list[LoopbackTransport]) -> None:
        super().__init__()
        self.peers = peers  # every transport on this "broker"
        peers.append(self)

    async def send(self, event: Event, body: bytes) -> Event:
        wire = event.envelope(body)
        asyncio.get_running_loop().call_soon(self._deliver, wire)
        return event

    def _deliver(self, wire: bytes) -> None:
        event = Event.from_json(wire)
        for sub in [s for peer in self.peers for s in peer.subscriptions]:
            if sub.started and sub.pattern.matches(event.topic):
                sub.push(event)

    def make_subscription(self, pattern: str, **options: object) -> Subscription:
        return Subscription(self, pattern, **options)  # type: ignore[arg-type]


class TestThirdPartyTransport(TransportSuite):
    @pytest.fixture
    def factory(self) -> TransportFactory:
        peers: list[LoopbackTransport] = []
        alkpubsub.register("loopback", lambda url, settings: LoopbackTransport(peers))
        return lambda: alkpubsub.connect("loopback://")


async def test_registered_scheme_is_listed() -> None:
    alkpubsub.register("loopback", lambda url, settings: LoopbackTransport([]))
    from alkpubsub.registry import schemes

    assert "loopback" in schemes()
    transport = await alkpubsub.connect("loopback://")
    assert isinstance(transport, LoopbackTransport)
    await transport.close()
