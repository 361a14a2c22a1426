"""Both NATS transports against the shared conformance suite."""

from __future__ import annotations

import nats
import pytest
from brokers import NatsServer
from nats_garbage import wait_stored, write_garbage

import alkpubsub
from alkpubsub.conformance import (
    GarbageWriter,
    OtherProcess,
    TransportFactory,
    TransportSuite,
    unique,
)
from alkpubsub.conformance.restart import BrokerRestartSuite
from alkpubsub.transports._nats_common import to_subject


class TestNatsConformance(TransportSuite):
    @pytest.fixture
    def prefix(self) -> str:
        # A subject prefix per test keeps tests apart on the shared server.
        return unique("alk")

    @pytest.fixture
    def url(self, nats_server_session: NatsServer, prefix: str) -> str:
        return f"{nats_server_session.url}?prefix={prefix}"

    @pytest.fixture
    def other_process(self, url: str) -> OtherProcess:
        return OtherProcess(url)

    @pytest.fixture
    def factory(self, url: str) -> TransportFactory:
        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make

    @pytest.fixture
    def garbage_writer(self, nats_server_session: NatsServer, prefix: str) -> GarbageWriter:
        server = nats_server_session

        async def write(topic: str) -> int:
            written = await write_garbage(server.url, server.port, to_subject(prefix, topic), topic)
            return written.total

        return write


class TestNatsDurableConformance(TransportSuite):
    @pytest.fixture
    def stream(self) -> str:
        # Streams' subjects must not overlap: a stream (and so a prefix) per test.
        return unique("S")

    @pytest.fixture
    def url(self, nats_server_session: NatsServer, stream: str) -> str:
        return f"{nats_server_session.url.replace('nats://', 'nats+durable://')}?stream={stream}"

    @pytest.fixture
    def other_process(self, url: str) -> OtherProcess:
        return OtherProcess(url)

    @pytest.fixture
    def factory(self, url: str) -> TransportFactory:
        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make

    @pytest.fixture
    def garbage_writer(self, nats_server_session: NatsServer, stream: str) -> GarbageWriter:
        server = nats_server_session

        async def write(topic: str) -> int:
            nc = await nats.connect(server.url)
            try:
                stored = (await nc.jetstream().stream_info(stream)).state.messages
            finally:
                await nc.close()
            # The stream's subjects are '<stream>.>': the stream name is the prefix.
            written = await write_garbage(server.url, server.port, to_subject(stream, topic), topic)
            await wait_stored(server.url, stream, stored + written.total)
            return written.total

        return write


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
