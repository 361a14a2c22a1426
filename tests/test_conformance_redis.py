"""Both Redis transports against the shared conformance suite."""

from __future__ import annotations

import pytest
from brokers import RedisServer

import alkpubsub
from alkpubsub.conformance import TransportFactory, TransportSuite, unique
from alkpubsub.conformance.restart import BrokerRestartSuite


class TestRedisConformance(TransportSuite):
    @pytest.fixture
    def factory(self, redis_server_session: RedisServer) -> TransportFactory:
        # Pub/sub channels are global to a server: a channel prefix per test.
        url = f"{redis_server_session.url}?prefix={unique('alk')}:"

        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make


class TestRedisDurableConformance(TransportSuite):
    @pytest.fixture
    def factory(self, redis_server_session: RedisServer) -> TransportFactory:
        # A stream per test keeps tests apart on the shared server.
        base = redis_server_session.url.replace("redis://", "redis+durable://")
        url = f"{base}?stream={unique('S')}"

        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make


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
