"""Both Redis transports against the shared conformance suite.

Each class's ``garbage_writer`` writes, with a raw redis-py client, where a
subscription of the transport made by its ``factory`` reads: PUBLISH on the
topic's channel (the same channel prefix), or XADD to the same stream.
"""

from __future__ import annotations

import pytest
from brokers import RedisServer
from redis_garbage import add_garbage, publish_garbage

import alkpubsub
from alkpubsub.conformance import (
    GarbageWriter,
    OtherProcess,
    TransportFactory,
    TransportSuite,
    unique,
)
from alkpubsub.conformance.restart import BrokerRestartSuite


class TestRedisConformance(TransportSuite):
    @pytest.fixture
    def prefix(self) -> str:
        # Pub/sub channels are global to a server: a channel prefix per test.
        return f"{unique('alk')}:"

    @pytest.fixture
    def url(self, redis_server_session: RedisServer, prefix: str) -> str:
        return f"{redis_server_session.url}?prefix={prefix}"

    @pytest.fixture
    def other_process(self, url: str) -> OtherProcess:
        return OtherProcess(url)

    @pytest.fixture
    def factory(self, url: str) -> TransportFactory:
        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make

    @pytest.fixture
    def garbage_writer(self, redis_server_session: RedisServer, prefix: str) -> GarbageWriter:
        async def write(topic: str) -> int:
            return await publish_garbage(redis_server_session.url, prefix + topic, topic)

        return write


class TestRedisDurableConformance(TransportSuite):
    @pytest.fixture
    def stream(self) -> str:
        # A stream per test keeps tests apart on the shared server.
        return unique("S")

    @pytest.fixture
    def url(self, redis_server_session: RedisServer, stream: str) -> str:
        base = redis_server_session.url.replace("redis://", "redis+durable://")
        return f"{base}?stream={stream}"

    @pytest.fixture
    def other_process(self, url: str) -> OtherProcess:
        return OtherProcess(url)

    @pytest.fixture
    def factory(self, url: str) -> TransportFactory:
        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make

    @pytest.fixture
    def garbage_writer(self, redis_server_session: RedisServer, stream: str) -> GarbageWriter:
        async def write(topic: str) -> int:
            return await add_garbage(redis_server_session.url, stream, topic)

        return write


class TestRedisRestart(BrokerRestartSuite):
    @pytest.fixture
    def broker(self, redis_server: RedisServer) -> RedisServer:
        return redis_server

    @pytest.fixture
    def url(self, redis_server: RedisServer) -> str:
        return redis_server.url

    @pytest.fixture
    def factory(self, url: str) -> TransportFactory:
        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make


class TestRedisDurableRestart(TestRedisRestart):
    @pytest.fixture
    def url(self, redis_server: RedisServer) -> str:
        # A killed member's entries become claimable after claim_idle: keep it short here.
        base = redis_server.url.replace("redis://", "redis+durable://")
        return f"{base}?stream={unique('S')}&claim_idle=1"
