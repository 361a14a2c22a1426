"""Both Honker transports against the shared conformance suite.

Each test gets its own database file; every transport the factory makes opens
that same file, so one transport can publish and another receive (in this
process they share one honker Database, writer and watcher, as in production).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import alkpubsub
from alkpubsub.conformance import TransportFactory, TransportSuite


class TestHonkerConformance(TransportSuite):
    @pytest.fixture
    def factory(self, tmp_path: Path) -> TransportFactory:
        url = f"honker://{tmp_path}/events.db"

        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make


class TestHonkerDurableConformance(TransportSuite):
    @pytest.fixture
    def factory(self, tmp_path: Path) -> TransportFactory:
        url = f"honker+durable://{tmp_path}/events.db?stream=events"

        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make
