"""Both NATS transports against the shared conformance suite."""

from __future__ import annotations

import pytest
from brokers import NatsServer

import alkpubsub
from alkpubsub.conformance import TransportFactory, TransportSuite, unique


class TestNatsConformance(TransportSuite):
    @pytest.fixture
    def factory(self, nats_server_session: NatsServer) -> TransportFactory:
        # A subject prefix per test keeps tests apart on the shared server.
        url = f"{nats_server_session.url}?prefix={unique('alk')}"

        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make


class TestNatsDurableConformance(TransportSuite):
    @pytest.fixture
    def factory(self, nats_server_session: NatsServer) -> TransportFactory:
        # Streams' subjects must not overlap: a stream (and so a prefix) per test.
        url = (
            f"{nats_server_session.url.replace('nats://', 'nats+durable://')}?stream={unique('S')}"
        )

        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make
