"""The composite transport: a local leg plus targets, each event once per subscriber."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from brokers import NatsServer, RedisServer

import alkpubsub
from alkpubsub import PublishError, Transport
from alkpubsub.composite import CompositeTransport
from alkpubsub.conformance import (
    OtherProcess,
    TransportFactory,
    TransportSuite,
    collect,
    nothing_more,
    unique,
)
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


class _FileComposite(TransportSuite):
    """A composite whose targets another process can open too."""

    @pytest.fixture
    def urls(self, tmp_path: Path) -> list[str]:
        raise NotImplementedError

    @pytest.fixture
    def other_process(self, urls: list[str]) -> OtherProcess:
        return OtherProcess(urls)

    @pytest.fixture
    def factory(self, urls: list[str]) -> TransportFactory:
        async def make() -> Transport:
            return await alkpubsub.connect(urls)

        return make


class TestCompositeWithHonkerConformance(_FileComposite):
    """In-process delivery plus ephemeral Honker notifications in one file."""

    @pytest.fixture
    def urls(self, tmp_path: Path) -> list[str]:
        return ["memory://", f"honker://{tmp_path / 'events.db'}"]


class TestCompositeWithHonkerDurableConformance(_FileComposite):
    """The deployment the README recommends for a hot single node: in-process
    delivery plus a Honker durable stream, which also serves durable consumers."""

    @pytest.fixture
    def urls(self, tmp_path: Path) -> list[str]:
        return ["memory://", f"honker+durable://{tmp_path / 'events.db'}"]


class TestCompositeWithHonkerDurableAndNatsConformance(_FileComposite):
    """A node that persists locally and also publishes live to other nodes."""

    @pytest.fixture
    def urls(self, tmp_path: Path, nats_server_session: NatsServer) -> list[str]:
        prefix = unique("alk")
        return [
            "memory://",
            f"honker+durable://{tmp_path / 'events.db'}",
            f"{nats_server_session.url}?prefix={prefix}",
        ]


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

    async def send(self, event: alkpubsub.Event, body: bytes) -> alkpubsub.Event:
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


# -- required and optional targets, against a real broker that is down or hung --


async def test_publish_returns_the_durable_targets_offset(tmp_path: Path) -> None:
    composite = await alkpubsub.connect(["memory://", f"honker+durable://{tmp_path / 'e.db'}"])
    async with (
        composite.subscribe("a:b") as live,
        composite.subscribe("a:b", consumer="c", start="earliest") as durable,
    ):
        sent = [await composite.publish("a:b", i) for i in range(3)]
        sent += await composite.publish_many([("a:b", 3), ("a:b", 4)])
        offsets = [e.offset for e in sent]
        assert all(isinstance(o, int) for o in offsets) and offsets == sorted(set(offsets))
        assert [e.offset for e in await collect(durable, 5)] == offsets
        assert [(e.id, e.offset) for e in await collect(live, 5)] == [
            (e.id, e.offset) for e in sent
        ]
    await composite.close()


async def test_a_required_target_that_is_down_fails_the_publish(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    honker = f"honker+durable://{tmp_path / 'e.db'}"
    composite = await alkpubsub.connect(["memory://", honker, redis_server.url])
    async with composite.subscribe("a:b") as sub:
        await composite.publish("a:b", "before")
        await collect(sub, 1)
        redis_server.stop()
        with pytest.raises(PublishError) as info:
            await composite.publish("a:b", "while down")
        # Not delivered in-process by the publish; but Honker stored it, so it
        # reaches this subscriber from there, as it reaches every other one.
        [late] = await collect(sub, 1)
        assert late.id == info.value.events[0].id and late.offset is not None
        await nothing_more(sub)
    durable_name = composite.targets[0].name
    assert info.value.succeeded == (durable_name,)
    assert "redis" in str(info.value) and "not delivered in-process" in str(info.value)
    [_, redis_leg] = composite.leg_stats
    assert (redis_leg.accepted, redis_leg.failed) == (1, 1)
    await composite.close()


async def test_a_required_target_that_hangs_times_out(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    target = f"{redis_server.url}?composite_timeout=0.3"
    composite = await alkpubsub.connect(["memory://", target])
    async with composite.subscribe("a:b") as sub:
        await composite.publish("a:b", "before")
        assert redis_server.pid is not None
        os.kill(redis_server.pid, signal.SIGSTOP)  # the broker hangs: no answer, no error
        try:
            started = time.monotonic()
            with pytest.raises(PublishError, match=r"composite_timeout=0\.3"):
                await composite.publish("a:b", "while hung")
            assert time.monotonic() - started < 3
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        # "before", then "while hung": Redis ran the PUBLISH once it woke up, and
        # a copy of a publish whose outcome was unknown here is delivered.
        got = await collect(sub, 2)
        assert [e.payload for e in got] == ["before", "while hung"]
        await nothing_more(sub)
    assert composite.leg_stats[0].timed_out == 1
    await composite.close()


async def test_an_optional_target_that_fails_is_counted_and_logged(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    honker = f"honker+durable://{tmp_path / 'e.db'}"
    optional = f"{redis_server.url}?composite_required=false&composite_timeout=0.5"
    composite = await alkpubsub.connect(["memory://", honker, optional])
    async with composite.subscribe("a:b") as sub:
        redis_server.stop()
        sent = [await composite.publish("a:b", i) for i in range(3)]
        got = await collect(sub, 3)
    assert [e.id for e in got] == [e.id for e in sent]
    assert all(e.offset is not None for e in sent)  # the durable target took each one
    durable, redis_leg = composite.leg_stats
    assert (durable.accepted, durable.failed) == (3, 0)
    assert (redis_leg.required, redis_leg.accepted, redis_leg.failed) == (False, 0, 3)
    warnings = [r for r in caplog.records if "optional target" in r.getMessage()]
    assert len(warnings) == 1  # logged when it started failing, not per event
    await composite.close()


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        (["memory://?composite_timeout=1", "memory://x"], "not to the local leg"),
        (
            ["memory://", "honker+durable:///tmp/x.db?composite_required=false"],
            "cannot be optional",
        ),
        (["memory://", "memory://x?composite_required=maybe"], "not a boolean"),
        (["memory://", "memory://x?composite_timeout=-1"], r"seconds >= 0"),
        (["memory://", "memory://x?composite_timeout=soon"], r"seconds >= 0"),
    ],
)
async def test_bad_composite_options_are_refused(urls: list[str], message: str) -> None:
    with pytest.raises(alkpubsub.ConfigError, match=message):
        await alkpubsub.connect(urls)


async def test_composite_options_do_not_reach_the_targets_own_parser(tmp_path: Path) -> None:
    url = f"honker+durable://{tmp_path / 'e.db'}?stream=s1&composite_timeout=2"
    composite = await alkpubsub.connect(["memory://", url])
    assert composite.leg_stats[0].timeout == 2.0
    assert composite.targets[0].stream == "s1"  # type: ignore[attr-defined]
    await composite.close()


async def test_a_subscription_starts_while_an_optional_target_is_down_and_joins_it_later(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    honker = f"honker+durable://{tmp_path / 'e.db'}"
    optional = f"{redis_server.url}?composite_required=false"
    composite = await alkpubsub.connect(["memory://", honker, optional])
    redis_server.stop()
    async with composite.subscribe("a:b") as sub:
        local = await composite.publish("a:b", "local")
        assert [e.id for e in await collect(sub, 1)] == [local.id]
        redis_server.start()
        other_node = await alkpubsub.connect(redis_server.url)
        deadline = time.monotonic() + 10
        remote: list[alkpubsub.Event] = []
        while not remote and time.monotonic() < deadline:
            sent = await other_node.publish("a:b", "from another node")
            try:
                remote = [await sub.get(timeout=0.5)]
            except TimeoutError:
                continue
        assert remote and remote[0].id == sent.id and remote[0].origin == other_node.origin
        await other_node.close()
    await composite.close()


async def test_own_rows_passed_over_unread_never_hide_rows_committed_beside_them(
    tmp_path: Path,
) -> None:
    # The durable leg's reader passes over the composite's own rows without
    # reading them (skip_own); rows that another job of the same group commit
    # wrote next to them (tx.publish on the same store, here at the same time)
    # must still be read, each once.
    composite = await alkpubsub.connect(["memory://", f"honker+durable://{tmp_path / 'e.db'}"])
    store = composite.targets[0].store  # type: ignore[attr-defined]

    async def in_transaction(i: int) -> str:
        async with store.atransaction() as tx:
            return str((await tx.publish("a:b", {"tx": i})).id)

    async with composite.subscribe("a:b", buffer=1000) as sub:
        jobs = [composite.publish("a:b", {"pub": i}) for i in range(200)]
        jobs += [in_transaction(i) for i in range(200)]
        done = await asyncio.gather(*jobs)
        sent = {d if isinstance(d, str) else d.id for d in done}
        got = await collect(sub, 400)
        await nothing_more(sub)
    assert {e.id for e in got} == sent and len(got) == 400
    await composite.close()
