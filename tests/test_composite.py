"""The composite transport: a local leg plus targets, each event once per subscriber."""

from __future__ import annotations

from pathlib import Path

import pytest

import alkpubsub
from alkpubsub import PublishError, Transport
from alkpubsub.composite import CompositeTransport
from alkpubsub.conformance import TransportFactory, TransportSuite, collect, nothing_more, unique
from alkpubsub.transports.inprocess import InProcessTransport


class TestCompositeConformance(TransportSuite):
    @pytest.fixture
    def factory(self) -> TransportFactory:
        # Each composite has a private local bus; a shared named bus stands in
        # for the target that other processes would share.
        shared = f"memory://{unique('shared')}"

        async def make() -> Transport:
            return await alkpubsub.connect(["memory://", shared])

        return make


class TestCompositeWithHonkerConformance(TransportSuite):
    """The deployment the README recommends for a hot single node: in-process
    delivery plus a Honker durable stream, which also serves durable consumers."""

    @pytest.fixture
    def factory(self, tmp_path: Path) -> TransportFactory:
        urls = ["memory://", f"honker+durable://{tmp_path / 'events.db'}"]

        async def make() -> Transport:
            return await alkpubsub.connect(urls)

        return make


async def test_local_subscriber_gets_own_events_once_despite_the_echo() -> None:
    shared = f"memory://{unique()}"
    composite = await alkpubsub.connect(["memory://", shared])
    async with composite.subscribe("a:b") as sub:
        sent = await composite.publish("a:b", 1)
        [got] = await collect(sub, 1)
        await nothing_more(sub)
    assert got.id == sent.id
    await composite.close()


async def test_other_composite_receives_through_the_target() -> None:
    shared = f"memory://{unique()}"
    one = await alkpubsub.connect(["memory://", shared])
    two = await alkpubsub.connect(["memory://", shared])
    async with two.subscribe("a:*") as sub:
        sent = await one.publish("a:b", {"x": 1})
        [got] = await collect(sub, 1)
        await nothing_more(sub)
    assert (got.id, got.origin) == (sent.id, one.origin)
    await one.close()
    await two.close()


class _FailingTarget(InProcessTransport):
    """A target whose writes fail, as a broker that is down would."""

    async def forward(self, event: alkpubsub.Event) -> alkpubsub.Event:
        raise alkpubsub.ConnectionLost("target is down")


async def test_failed_target_means_no_local_delivery_and_names_the_legs() -> None:
    good = InProcessTransport(unique())
    composite = CompositeTransport(InProcessTransport(), good, _FailingTarget())
    async with composite.subscribe("a:b") as sub:
        with pytest.raises(PublishError) as info:
            await composite.publish("a:b", 1)
        await nothing_more(sub)
    assert info.value.succeeded == (good.name,)
    assert "ConnectionLost" in str(info.value)
    await composite.close()


async def test_composite_declares_what_its_legs_can_do() -> None:
    composite = await alkpubsub.connect(["memory://", f"memory://{unique()}"])
    assert composite.capabilities.wildcards and composite.capabilities.ordered
    assert not composite.capabilities.consumer_offsets
    with pytest.raises(alkpubsub.ConfigError):
        composite.subscribe("a:b", consumer="c")
    await composite.close()
