"""The in-process transport against the shared conformance suite."""

from __future__ import annotations

import pytest

import alkpubsub
from alkpubsub.conformance import TransportFactory, TransportSuite, unique


class TestInProcessConformance(TransportSuite):
    @pytest.fixture
    def factory(self) -> TransportFactory:
        url = f"memory://{unique('bus')}"  # one named bus per test, shared by its transports

        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make
