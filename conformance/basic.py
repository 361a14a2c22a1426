"""Cases every transport must pass: live publish/subscribe behaviour.

Every case subscribes first and publishes second, so ephemeral transports
(which have no history) are held to exactly the same demands as durable ones.
"""

from __future__ import annotations

import asyncio

import pytest

from alkpubsub import (
    Capabilities,
    Closed,
    ConfigError,
    InvalidTopic,
    Pattern,
    PayloadError,
    Transport,
)

from .patterns import BAD_PATTERNS, BAD_TOPICS, PATTERN_TABLE
from .suite import (
    RECEIVE_TIMEOUT,
    SuiteFixtures,
    TransportFactory,
    collect,
    nothing_more,
    unique,
)


class BasicCases(SuiteFixtures):
    """Publish/subscribe behaviour demanded of every transport."""

    async def test_publish_subscribe_keeps_payload_and_headers(self, transport: Transport) -> None:
        topic = f"{unique()}:created"
        payload = {
            "graphId": "g-1",
            "nested": {"list": [1, 2.5, None, True, "ü ✓"], "empty": {}},
            "big": 2**53,
        }
        headers = {"trace-id": "abc123", "content-type": "application/json"}
        async with transport.subscribe(topic) as sub:
            sent = await transport.publish(topic, payload, headers=headers)
            [got] = await collect(sub, 1)
        assert got.id == sent.id
        assert got.topic == topic
        assert got.payload == payload
        assert got.headers == headers
        assert got.origin == sent.origin == transport.origin
        assert got.published_at == sent.published_at
        assert got.published_at.utcoffset() is not None, "published_at must be timezone-aware"

    async def test_scalar_and_list_payloads_arrive_unchanged(self, transport: Transport) -> None:
        topic = unique()
        payloads = [None, 0, -1.5, "text", True, [], [1, "two", {"3": 3}], {"k": None}]
        async with transport.subscribe(topic) as sub:
            for p in payloads:
                await transport.publish(topic, p)
            got = await collect(sub, len(payloads))
        assert sorted(map(repr, (e.payload for e in got))) == sorted(map(repr, payloads))

    async def test_subscribe_then_publish_has_no_race(self, transport: Transport) -> None:
        # Each round subscribes and publishes at once: the event published right
        # after __aenter__ returns must arrive, 30 times in a row.
        for i in range(30):
            topic = unique("race")
            async with transport.subscribe(topic) as sub:
                await transport.publish(topic, {"round": i})
                [got] = await collect(sub, 1)
                assert got.payload == {"round": i}

    async def test_events_cross_between_transport_instances(
        self, connect: TransportFactory
    ) -> None:
        publisher, subscriber = await connect(), await connect()
        topic = unique()
        async with subscriber.subscribe(topic) as sub:
            sent = await publisher.publish(topic, {"from": "other instance"})
            [got] = await collect(sub, 1)
        assert got.id == sent.id

    async def test_many_concurrent_publishers_and_subscribers_lose_nothing(
        self, connect: TransportFactory
    ) -> None:
        # 8 publishers x 100 events in parallel, 4 subscribers on their own
        # transport instances: each subscriber gets all 800, none twice.
        topic = unique()
        publishers = [await connect() for _ in range(2)]
        subscribers = [await connect() for _ in range(2)]
        subs = [t.subscribe(topic, buffer=2000) for t in subscribers for _ in range(2)]
        for sub in subs:
            await sub.start()

        async def publish_100(n: int) -> list[str]:
            t = publishers[n % len(publishers)]
            return [(await t.publish(topic, {"p": n, "i": i})).id for i in range(100)]

        sent = {i for ids in await asyncio.gather(*(publish_100(n) for n in range(8))) for i in ids}
        assert len(sent) == 800
        for sub in subs:
            got = await collect(sub, 800, timeout=RECEIVE_TIMEOUT * 3)
            assert {e.id for e in got} == sent
            await nothing_more(sub)
            await sub.close()

    async def test_many_topics_at_once_each_gets_its_own(self, transport: Transport) -> None:
        base = unique()
        topics = [f"{base}:t{i}" for i in range(40)]
        subs = [transport.subscribe(t) for t in topics]
        for sub in subs:
            await sub.start()
        await transport.publish_many([(t, {"n": n}) for n in range(10) for t in topics])
        for topic, sub in zip(topics, subs, strict=True):
            got = await collect(sub, 10)
            assert {e.topic for e in got} == {topic}
            assert sorted(e.payload["n"] for e in got) == list(range(10))
            await nothing_more(sub, 0.05)
            await sub.close()

    async def test_topic_isolation(self, transport: Transport) -> None:
        base = unique()
        async with transport.subscribe(f"{base}:a") as sub:
            for other in (base, f"{base}:b", f"{base}:a:deeper", f"{base}x:a", f"x{base}:a"):
                await transport.publish(other, {"wrong": other})
            await transport.publish(f"{base}:a", {"right": True})
            [got] = await collect(sub, 1)
            assert got.payload == {"right": True}
            await nothing_more(sub)

    async def test_pattern_table_matches_on_every_transport(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        # Every row of the shared table, prefixed so this case sees only its own events.
        base = unique("pt")
        subs = {}
        for pattern in sorted({p for p, _, _ in PATTERN_TABLE}):
            full = f"{base}:{pattern}"
            if not caps.wildcards and ("*" in pattern or ">" in pattern):
                with pytest.raises(ConfigError):
                    transport.subscribe(full)
                continue
            subs[pattern] = transport.subscribe(full)
            await subs[pattern].start()
        topics = sorted({t for _, t, _ in PATTERN_TABLE})
        for topic in topics:
            await transport.publish(f"{base}:{topic}", {"topic": topic})
        for pattern, sub in subs.items():
            # With the prefix, a pattern also matches other topics of the table;
            # the reference matcher (itself checked row by row against the
            # table in the unit tests) says exactly which.
            reference = Pattern(f"{base}:{pattern}")
            expected = {t for t in topics if reference.matches(f"{base}:{t}")}
            listed = {t for p, t, m in PATTERN_TABLE if p == pattern and m}
            refused = {t for p, t, m in PATTERN_TABLE if p == pattern and not m}
            assert listed <= expected and not (refused & expected)
            got = await collect(sub, len(expected))
            got_topics = {e.payload["topic"] for e in got}
            assert got_topics == expected, f"{pattern!r}: {got_topics ^ expected}"
            await nothing_more(sub, 0.05)
            await sub.close()

    async def test_order_kept_per_publisher(self, transport: Transport, caps: Capabilities) -> None:
        topic = unique()
        async with transport.subscribe(topic, buffer=1000) as sub:
            for i in range(300):
                await transport.publish(topic, i)
            got = [e.payload for e in await collect(sub, 300)]
        if caps.ordered:
            assert got == list(range(300))
        else:
            assert sorted(got) == list(range(300))

    async def test_publish_many_keeps_order_and_returns_events(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        topic = unique()
        async with transport.subscribe(topic, buffer=1000) as sub:
            events = await transport.publish_many([(topic, {"i": i}) for i in range(200)])
            got = await collect(sub, 200)
        assert [e.payload for e in events] == [{"i": i} for i in range(200)]
        assert len({e.id for e in events}) == 200
        if caps.ordered:
            assert [e.id for e in got] == [e.id for e in events]
        assert await transport.publish_many([]) == []

    async def test_close_subscription_while_publishing(self, transport: Transport) -> None:
        topic = unique()
        sub = transport.subscribe(topic)
        await sub.start()
        stop = asyncio.Event()

        async def keep_publishing() -> int:
            n = 0
            while not stop.is_set():
                await transport.publish(topic, n)
                n += 1
                await asyncio.sleep(0)
            return n

        publisher = asyncio.create_task(keep_publishing())
        await collect(sub, 5)
        await sub.close()
        # The iterator ends at once, and the publisher is unaffected.
        with pytest.raises(StopAsyncIteration):
            async with asyncio.timeout(RECEIVE_TIMEOUT):
                while True:
                    await sub.__anext__()
        await asyncio.sleep(0.05)
        stop.set()
        assert await publisher > 5
        with pytest.raises(Closed):
            await sub.start()

    async def test_closing_one_subscription_leaves_others_running(
        self, transport: Transport
    ) -> None:
        topic = unique()
        keep = transport.subscribe(topic)
        drop = transport.subscribe(topic)
        await keep.start()
        await drop.start()
        await transport.publish(topic, 1)
        await collect(drop, 1)
        await drop.close()
        await transport.publish(topic, 2)
        got = await collect(keep, 2)
        assert [e.payload for e in got] == [1, 2]
        await keep.close()

    async def test_transport_close_ends_iterators_and_refuses_use(
        self, connect: TransportFactory
    ) -> None:
        transport = await connect()
        topic = unique()
        sub = transport.subscribe(topic)
        await sub.start()
        waiter = asyncio.create_task(anext(sub))
        await asyncio.sleep(0.05)
        await asyncio.wait_for(transport.close(), RECEIVE_TIMEOUT)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiter, RECEIVE_TIMEOUT)
        with pytest.raises(Closed):
            await transport.publish(topic, 1)
        with pytest.raises(Closed):
            transport.subscribe(topic)
        await transport.close()  # closing twice is harmless

    async def test_concurrent_close_of_many_pairs_then_fresh_subscriber_gets_all(
        self, connect: TransportFactory
    ) -> None:
        topic = unique()
        transports = [await connect() for _ in range(4)]
        subs = [t.subscribe(topic) for t in transports for _ in range(5)]
        for sub in subs:
            await sub.start()
        await asyncio.gather(*(sub.close() for sub in subs))
        fresh_transport = await connect()
        async with fresh_transport.subscribe(topic) as fresh:
            sent = [await transports[0].publish(topic, i) for i in range(20)]
            got = await collect(fresh, 20)
        assert {e.id for e in got} == {e.id for e in sent}

    @pytest.mark.parametrize("bad", BAD_TOPICS, ids=repr)
    async def test_bad_topic_is_refused(self, transport: Transport, bad: object) -> None:
        with pytest.raises(InvalidTopic) as info:
            await transport.publish(bad, {})  # type: ignore[arg-type]
        assert repr(bad)[:20] in str(info.value) or type(bad).__name__ in str(info.value)

    async def test_publishing_to_the_dead_letter_namespace_is_refused(
        self, transport: Transport
    ) -> None:
        for topic in ("dead", f"dead:{unique()}"):
            with pytest.raises(InvalidTopic, match="reserved"):
                await transport.publish(topic, 1)
            with pytest.raises(InvalidTopic, match="reserved"):
                await transport.publish_many([(topic, 1)])

    @pytest.mark.parametrize("bad", BAD_PATTERNS, ids=repr)
    def test_bad_pattern_is_refused(self, transport: Transport, bad: object) -> None:
        with pytest.raises(InvalidTopic):
            transport.subscribe(bad)  # type: ignore[arg-type]

    async def test_bad_payload_is_refused_and_nothing_accepted_is_lost(
        self, transport: Transport
    ) -> None:
        topic = unique()
        async with transport.subscribe(topic) as sub:
            await transport.publish(topic, "before")
            with pytest.raises(PayloadError) as info:
                await transport.publish(topic, {"when": object()})
            assert topic in str(info.value)
            with pytest.raises(PayloadError):
                await transport.publish(topic, 1, headers={"n": 1})  # type: ignore[dict-item]
            with pytest.raises(PayloadError):
                # One bad item refuses the whole batch before anything is published.
                await transport.publish_many([(topic, "ok"), (topic, {1, object()})])
            await transport.publish(topic, "after")
            got = await collect(sub, 2)
            assert [e.payload for e in got] == ["before", "after"]
            await nothing_more(sub)

    async def test_slow_subscriber_blocks_neither_publisher_nor_others(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        # Whichever overflow policy the subscription declares must hold exactly.
        topic = unique()
        n, size = 300, 10
        slow = transport.subscribe(topic, buffer=size)
        fast = transport.subscribe(topic, buffer=n)
        await slow.start()
        await fast.start()
        async with asyncio.timeout(RECEIVE_TIMEOUT * 2):
            sent = [await transport.publish(topic, i) for i in range(n)]
        got = await collect(fast, n)
        assert [e.id for e in got] == [e.id for e in sent] or not caps.ordered
        if slow.overflow == "pause":
            # A durable reader pauses reading instead of dropping.
            rest = await collect(slow, n)
            assert {e.id for e in rest} == {e.id for e in sent}
            assert slow.stats.dropped == 0
        else:
            # Wait until every event reached the slow buffer or was dropped.
            async with asyncio.timeout(RECEIVE_TIMEOUT):
                while slow.stats.dropped + slow.buffered < n:  # noqa: ASYNC110 - polls stats
                    await asyncio.sleep(0.01)
            assert slow.buffered == size
            assert slow.stats.dropped == n - size
            kept = await collect(slow, size)
            if caps.ordered:
                assert [e.payload for e in kept] == list(range(n - size, n))
        await slow.close()
        await fast.close()

    async def test_refuses_what_it_does_not_declare(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        topic = unique()
        if not caps.consumer_offsets:
            with pytest.raises(ConfigError, match="consumer"):
                transport.subscribe(topic, consumer="worker")
        if not caps.replay:
            with pytest.raises(ConfigError, match="start"):
                transport.subscribe(topic, start="earliest")
            with pytest.raises(ConfigError, match="start"):
                transport.subscribe(topic, start=0)
        if not caps.wildcards:
            with pytest.raises(ConfigError):
                transport.subscribe(f"{topic}:*")
        with pytest.raises(ConfigError):
            transport.subscribe(topic, buffer=0)
        # Whatever it declares, it still delivers live events after all that.
        async with transport.subscribe(topic) as sub:
            await transport.publish(topic, "still fine")
            [got] = await collect(sub, 1)
            assert got.payload == "still fine"
