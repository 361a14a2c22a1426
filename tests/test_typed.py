"""Typed topics over any transport (``alkpubsub.PubSub``), here over ``memory://``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel

import alkpubsub
from alkpubsub import ConfigError, InvalidTopic, PayloadError, PubSub


class GraphCreated(BaseModel):
    graphId: str
    nodes: int = 0


class CallEvent(BaseModel):
    status: str


class Unrelated(BaseModel):
    colour: str


@pytest.fixture
async def pubsub() -> AsyncIterator[PubSub]:
    facade = PubSub(await alkpubsub.connect("memory://"))
    yield facade
    await facade.close()


async def test_typed_publish_subscribe_round_trip(pubsub: PubSub) -> None:
    graph_created = pubsub.topic("graph:created", GraphCreated)
    async with graph_created.subscribe() as sub:
        event = await graph_created.publish(GraphCreated(graphId="g1", nodes=3))
        item = await sub.get(timeout=1)
    assert isinstance(item, GraphCreated)
    assert item == GraphCreated(graphId="g1", nodes=3)
    assert event.topic == "graph:created"
    assert event.payload == {"graphId": "g1", "nodes": 3}  # the model's JSON form
    assert sub.current is not None
    assert sub.current.id == event.id  # the envelope behind the model


async def test_typed_publish_accepts_a_dict_that_validates(pubsub: PubSub) -> None:
    graph_created = pubsub.topic("graph:created", GraphCreated)
    async with graph_created.subscribe() as sub:
        await graph_created.publish({"graphId": "g2"})  # type: ignore[arg-type]
        assert await sub.get(timeout=1) == GraphCreated(graphId="g2", nodes=0)


async def test_request_id_routing_delivers_only_own_calls_and_all_to_wildcard(
    pubsub: PubSub,
) -> None:
    calls = pubsub.topic("call:{request_id}", CallEvent)
    async with (
        calls.subscribe(request_id="req-42") as mine,
        calls.subscribe(request_id="req-7") as other,
        calls.subscribe() as every,
    ):
        assert mine.subscription.pattern.text == "call:req-42"
        assert every.subscription.pattern.text == "call:*"
        first = await calls.publish(CallEvent(status="started"), request_id="req-42")
        await calls.publish(CallEvent(status="queued"), request_id="req-7")
        await calls.publish(CallEvent(status="done"), request_id="req-42")
        assert first.topic == "call:req-42"

        assert [await mine.get(timeout=1) for _ in range(2)] == [
            CallEvent(status="started"),
            CallEvent(status="done"),
        ]
        assert await other.get(timeout=1) == CallEvent(status="queued")
        got = [await every.get(timeout=1) for _ in range(3)]
        assert [g.status for g in got] == ["started", "queued", "done"]
        # In-process delivery is synchronous: nothing else is waiting anywhere.
        assert (mine.subscription.buffered, other.subscription.buffered) == (0, 0)
        assert every.subscription.buffered == 0


@pytest.mark.parametrize(
    "wrong",
    [Unrelated(colour="red"), {"graphId": 5}, {"nodes": 1}, "g1", None],
    ids=["other-model", "wrong-field-type", "missing-field", "str", "none"],
)
async def test_publish_of_wrong_type_raises_payload_error(pubsub: PubSub, wrong: object) -> None:
    graph_created = pubsub.topic("graph:created", GraphCreated)
    async with graph_created.subscribe() as sub:
        with pytest.raises(PayloadError, match="is not a valid GraphCreated"):
            await graph_created.publish(wrong)  # type: ignore[arg-type]
        assert sub.subscription.buffered == 0  # nothing was published


@pytest.mark.parametrize(
    "template",
    ["call:req-{request_id}", "call:{request_id}-x", "call:{a}{b}", "call:{0}", "call:{ id }"],
)
def test_placeholder_not_filling_a_whole_segment_raises_config_error(
    pubsub: PubSub, template: str
) -> None:
    with pytest.raises(ConfigError, match="a placeholder must fill a whole segment"):
        pubsub.topic(template, CallEvent)


@pytest.mark.parametrize("template", ["call:{request_id", "call:request_id}", "call::{x}"])
def test_malformed_template_raises_invalid_topic_or_config_error(
    pubsub: PubSub, template: str
) -> None:
    with pytest.raises((ConfigError, InvalidTopic)):
        pubsub.topic(template, CallEvent)


async def test_publish_without_every_field_raises_config_error(pubsub: PubSub) -> None:
    calls = pubsub.topic("call:{request_id}", CallEvent)
    with pytest.raises(ConfigError, match=r"missing \['request_id'\]"):
        await calls.publish(CallEvent(status="x"))
    with pytest.raises(ConfigError, match=r"unexpected \['tenant'\]"):
        await calls.publish(CallEvent(status="x"), request_id="r", tenant="t")
    with pytest.raises(ConfigError, match="has no field"):
        calls.subscribe(tenant="t")


@pytest.mark.parametrize("value", ["a:b", "req:*"])
async def test_field_value_spanning_segments_is_refused(pubsub: PubSub, value: str) -> None:
    # "call:a:b" would silently miss every subscriber of "call:*".
    calls = pubsub.topic("call:{request_id}", CallEvent)
    with pytest.raises(InvalidTopic, match="a field fills exactly one segment"):
        await calls.publish(CallEvent(status="x"), request_id=value)
    with pytest.raises(InvalidTopic, match="a field fills exactly one segment"):
        calls.subscribe(request_id=value)


async def test_wildcard_field_value_is_refused_at_publish(pubsub: PubSub) -> None:
    calls = pubsub.topic("call:{request_id}", CallEvent)
    with pytest.raises(InvalidTopic, match="wildcard"):
        await calls.publish(CallEvent(status="x"), request_id="*")


async def test_invalid_payload_is_skipped_counted_and_subscription_survives(
    pubsub: PubSub,
) -> None:
    graph_created = pubsub.topic("graph:created", GraphCreated)
    transport = pubsub.transport
    async with graph_created.subscribe() as sub:
        # Another publisher, untyped, sends payloads that are not GraphCreated.
        await transport.publish("graph:created", {"graphId": 7})
        await transport.publish("graph:created", ["not", "an", "object"])
        await graph_created.publish(GraphCreated(graphId="g-ok"))
        assert await sub.get(timeout=1) == GraphCreated(graphId="g-ok")
        assert sub.stats.malformed == 2
        assert sub.stats.nacked == 2  # nacked, so a durable transport would dead-letter them
        assert sub.stats.delivered == 3  # the transport delivered all three
        assert not sub.subscription.closed
        # Still live for the next one.
        await graph_created.publish(GraphCreated(graphId="g-next"))
        assert await sub.get(timeout=1) == GraphCreated(graphId="g-next")
    assert sub.subscription.closed


async def test_typed_get_times_out_with_timeout_error(pubsub: PubSub) -> None:
    graph_created = pubsub.topic("graph:created", GraphCreated)
    async with graph_created.subscribe() as sub:
        with pytest.raises(TimeoutError):
            await sub.get(timeout=0.01)


async def test_typed_subscription_iterates_with_async_for(pubsub: PubSub) -> None:
    graph_created = pubsub.topic("graph:created", GraphCreated)
    async with graph_created.subscribe() as sub:
        for i in range(3):
            await graph_created.publish(GraphCreated(graphId=f"g{i}"))
        got: list[str] = []
        async with asyncio.timeout(1):
            async for item in sub:
                got.append(item.graphId)
                await sub.ack()
                if len(got) == 3:
                    break
    assert got == ["g0", "g1", "g2"]
    assert sub.stats.acked == 3
