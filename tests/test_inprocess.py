"""What only the in-process transport promises (the shared behaviours are in
the conformance suite, tests/test_conformance_memory.py).

In-process delivery is synchronous inside ``publish``: when it returns, every
matching live subscription holds the event. So these tests assert buffer
contents right after publishing, without waiting.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

import alkpubsub
from alkpubsub import Closed, Subscription, Transport
from alkpubsub.transports import inprocess


def bus_name() -> str:
    """A bus name no other test uses."""
    return f"bus-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def transport() -> AsyncIterator[Transport]:
    made = await alkpubsub.connect("memory://")
    yield made
    await made.close()


async def test_named_bus_is_shared_by_transports_opened_with_the_same_url() -> None:
    url = f"memory://{bus_name()}"
    publisher = await alkpubsub.connect(url)
    subscriber = await alkpubsub.connect(url)
    try:
        async with subscriber.subscribe("orders:*") as sub:
            await publisher.publish("orders:created", {"n": 1})
            event = await sub.get(timeout=1)
        assert event.payload == {"n": 1}
        assert event.origin == publisher.origin != subscriber.origin
    finally:
        await publisher.close()
        await subscriber.close()


async def test_differently_named_buses_are_separate() -> None:
    first = await alkpubsub.connect(f"memory://{bus_name()}")
    second = await alkpubsub.connect(f"memory://{bus_name()}")
    try:
        async with second.subscribe("orders:*") as sub:
            await first.publish("orders:created", {"n": 1})
            assert sub.buffered == 0
    finally:
        await first.close()
        await second.close()


async def test_unnamed_memory_buses_are_private() -> None:
    first = await alkpubsub.connect("memory://")
    second = await alkpubsub.connect("memory://")
    try:
        async with first.subscribe(">") as own, second.subscribe(">") as other:
            await first.publish("orders:created", {"n": 1})
            assert own.buffered == 1  # the publishing transport's own subscribers get it
            assert other.buffered == 0  # another memory:// transport does not
    finally:
        await first.close()
        await second.close()


async def test_named_bus_is_freed_when_its_last_transport_closes() -> None:
    name = bus_name()
    first = await alkpubsub.connect(f"memory://{name}")
    second = await alkpubsub.connect(f"memory://{name}")
    assert name in inprocess._buses
    await first.close()
    assert name in inprocess._buses  # second still uses it
    async with second.subscribe("a:b") as sub:
        third = await alkpubsub.connect(f"memory://{name}")
        await third.publish("a:b", 1)
        assert sub.buffered == 1
        await third.close()
    await second.close()
    assert name not in inprocess._buses
    await second.close()  # closing twice does not detach twice
    assert name not in inprocess._buses
    # A new transport with the same name starts a fresh, empty bus.
    fresh = await alkpubsub.connect(f"memory://{name}")
    try:
        assert len(inprocess._buses[name].router) == 0
        assert inprocess._buses[name].users == 1
    finally:
        await fresh.close()
    assert name not in inprocess._buses


async def test_full_buffer_drops_oldest_and_counts_drops(transport: Transport) -> None:
    async with transport.subscribe("tick", buffer=3) as sub:
        for i in range(5):
            await transport.publish("tick", i)
        assert sub.stats.dropped == 2  # 5 published into a buffer of 3
        assert sub.buffered == 3
        got = [(await sub.get(timeout=1)).payload for _ in range(3)]
    assert got == [2, 3, 4]  # the two oldest went
    assert sub.stats.delivered == 3


async def test_publish_many_also_drops_oldest(transport: Transport) -> None:
    async with transport.subscribe("tick", buffer=2) as sub:
        await transport.publish_many([("tick", i) for i in range(10)])
        assert sub.stats.dropped == 8
        assert [(await sub.get(timeout=1)).payload for _ in range(2)] == [8, 9]


async def test_get_with_timeout_raises_timeout_error_and_subscription_stays_usable(
    transport: Transport,
) -> None:
    async with transport.subscribe("a:b") as sub:
        with pytest.raises(TimeoutError):
            await sub.get(timeout=0.01)
        await transport.publish("a:b", "after")
        assert (await sub.get(timeout=1)).payload == "after"
        assert not sub.closed


async def test_no_asyncio_tasks_leak_after_close() -> None:
    before = asyncio.all_tasks()
    transport = await alkpubsub.connect(f"memory://{bus_name()}")
    subs = [transport.subscribe(p) for p in ("a:*", "a:b", ">")]
    for sub in subs:
        await sub.start()
    await transport.publish("a:b", {"n": 1})
    for sub in subs:
        assert (await sub.get(timeout=1)).payload == {"n": 1}
    with pytest.raises(TimeoutError):
        await subs[0].get(timeout=0.01)
    await transport.close()
    await asyncio.sleep(0)  # let anything cancelled finish
    assert asyncio.all_tasks() == before
    assert all(sub.closed for sub in subs)


async def test_subscription_repr_shows_pattern_state_and_transport() -> None:
    name = bus_name()
    transport = await alkpubsub.connect(f"memory://{name}")
    sub = transport.subscribe("graph:*")
    assert repr(sub) == f"<InProcessSubscription 'graph:*' new on memory://{name}>"
    await sub.start()
    assert repr(sub) == f"<InProcessSubscription 'graph:*' live on memory://{name}>"
    await transport.close()
    assert repr(sub) == f"<InProcessSubscription 'graph:*' closed on memory://{name}>"
    assert repr(transport) == "<InProcessTransport memory://" + name + " closed subs=0>"


async def test_subscription_without_async_with_starts_on_first_iteration(
    transport: Transport,
) -> None:
    sub = transport.subscribe("jobs:*")
    # Not live yet: an event published now is not delivered to it.
    await transport.publish("jobs:early", "early")
    assert sub.buffered == 0
    assert "new" in repr(sub)

    waiting = asyncio.create_task(anext(sub))
    await asyncio.sleep(0)  # the first iteration makes it live, then waits
    assert "live" in repr(sub)
    await transport.publish("jobs:late", "late")
    event = await asyncio.wait_for(waiting, 1)
    assert (event.topic, event.payload) == ("jobs:late", "late")

    await sub.close()
    with pytest.raises(StopAsyncIteration):
        await anext(sub)


async def test_async_for_without_async_with_receives_then_ends_on_close(
    transport: Transport,
) -> None:
    sub = transport.subscribe("jobs:*")
    received: list[object] = []

    async def consume(s: Subscription) -> None:
        async for event in s:
            received.append(event.payload)

    consumer = asyncio.create_task(consume(sub))
    await asyncio.sleep(0)
    for i in range(3):
        await transport.publish(f"jobs:{i}", i)
    await asyncio.sleep(0)
    await sub.close()
    await asyncio.wait_for(consumer, 1)  # the loop ended on close
    assert received == [0, 1, 2]


async def test_closed_subscription_cannot_be_started_again(transport: Transport) -> None:
    sub = transport.subscribe("a:b")
    await sub.close()  # closing one never started is fine
    with pytest.raises(Closed, match="subscribe again"):
        await sub.start()
    assert transport.subscriptions == []  # type: ignore[attr-defined]


async def test_closed_subscription_no_longer_receives(transport: Transport) -> None:
    async with transport.subscribe("a:b") as closing, transport.subscribe("a:b") as staying:
        await closing.close()
        await transport.publish("a:b", 1)
        assert closing.buffered == 0
        assert staying.buffered == 1


async def test_memory_url_name_and_default_origin() -> None:
    name = bus_name()
    named = await alkpubsub.connect(f"memory://{name}")
    private = await alkpubsub.connect("memory://")
    try:
        assert named.name == f"memory://{name}"
        assert private.name == "memory://"
        assert named.origin != private.origin  # each instance gets its own origin
    finally:
        await named.close()
        await private.close()
