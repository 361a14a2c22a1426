"""Both NATS transports against the shared conformance suite."""

from __future__ import annotations

import pytest
from brokers import NatsServer

import alkpubsub
from alkpubsub.conformance import TransportFactory, TransportSuite, unique
from alkpubsub.conformance.restart import BrokerRestartSuite


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


class TestNatsRestart(BrokerRestartSuite):
    @pytest.fixture
    def broker(self, nats_server: NatsServer) -> NatsServer:
        return nats_server

    @pytest.fixture
    def url(self, nats_server: NatsServer) -> str:
        return nats_server.url

    @pytest.fixture
    def factory(self, url: str) -> TransportFactory:
        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make


class TestNatsDurableRestart(TestNatsRestart):
    @pytest.fixture
    def url(self, nats_server: NatsServer) -> str:
        # A killed member's deliveries come back after ack_wait: keep it short here.
        base = nats_server.url.replace("nats://", "nats+durable://")
        return f"{base}?stream={unique('S').upper()}&ack_wait=1"
