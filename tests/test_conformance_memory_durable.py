"""The in-process durable transport (memory+durable://) against the shared
conformance suite: what application tests of durable consumers rely on."""

from __future__ import annotations

import pytest

import alkpubsub
from alkpubsub.conformance import TransportFactory, TransportSuite, unique


class TestInProcessDurableConformance(TransportSuite):
    @pytest.fixture
    def factory(self) -> TransportFactory:
        url = f"memory+durable://{unique('log')}"  # one named log per test

        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make
