"""Cases for durable transports (named consumers, at least once).

On a transport that does not declare ``consumer_offsets`` each case is
reported as skipped, naming the capability; that such a transport refuses a
named consumer with :class:`ConfigError` is checked once, by
``test_refuses_what_it_does_not_declare`` and
``test_malformed_subscribe_arguments_raise_pubsub_errors``.
"""

from __future__ import annotations

import asyncio

import pytest

from alkpubsub import Capabilities, ConfigError, ConsumerBusy, Transport
from alkpubsub.abilities import max_deliveries_of
from alkpubsub.topics import dead_letter_topic

from .suite import (
    QUIET,
    RECEIVE_TIMEOUT,
    SuiteFixtures,
    TransportFactory,
    collect,
    collect_acking,
    nothing_more,
    require,
    unique,
)


def max_deliveries(transport: Transport) -> int:
    """The transport's dead-letter threshold; a transport that dead-letters
    must say so through the :class:`~alkpubsub.abilities.DeadLetterPolicy` protocol."""
    limit = max_deliveries_of(transport)
    assert limit is not None, f"{transport.name} declares dead_letter but has no max_deliveries"
    return limit


class DurableCases(SuiteFixtures):
    """At-least-once behaviour demanded of transports with named consumers."""

    async def test_durable_consumer_resumes_after_last_ack(
        self, connect: TransportFactory, transport: Transport, caps: Capabilities
    ) -> None:
        require(caps, "consumer_offsets")
        topic, consumer = unique(), unique("c")
        sub = transport.subscribe(topic, consumer=consumer, start="earliest")
        await sub.start()
        sent = [await transport.publish(topic, i) for i in range(10)]
        got = await collect(sub, 6)
        for event in got:
            await sub.ack(event)
        await sub.close()
        await transport.close()
        # A new process would open a new transport: do the same.
        again = await connect()
        async with again.subscribe(topic, consumer=consumer, start="earliest") as sub2:
            rest = await collect_acking(sub2, 4)
            await nothing_more(sub2)
        assert [e.id for e in rest] == [e.id for e in sent[6:]]

    async def test_unacked_events_are_delivered_again_after_close(
        self, connect: TransportFactory, transport: Transport, caps: Capabilities
    ) -> None:
        require(caps, "consumer_offsets")
        topic, consumer = unique(), unique("c")
        async with transport.subscribe(topic, consumer=consumer, start="earliest") as sub:
            sent = [await transport.publish(topic, i) for i in range(5)]
            await collect(sub, 5)  # received, never acked
        other = await connect()
        async with other.subscribe(topic, consumer=consumer) as sub2:
            again = await collect_acking(sub2, 5, timeout=RECEIVE_TIMEOUT * 2)
        assert sorted(e.id for e in again) == sorted(e.id for e in sent)

    async def test_nack_delivers_the_event_again(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        require(caps, "consumer_offsets")
        topic, consumer = unique(), unique("c")
        async with transport.subscribe(topic, consumer=consumer) as sub:
            sent = await transport.publish(topic, {"job": 1})
            [first] = await collect(sub, 1)
            await sub.nack(first)
            [second] = await collect(sub, 1, timeout=RECEIVE_TIMEOUT * 2)
            await sub.ack(second)
            assert first.id == second.id == sent.id
            assert sub.stats.redelivered >= 1
            assert sub.stats.nacked == 1

    async def test_nack_with_delay_waits_before_redelivery(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        require(caps, "consumer_offsets")
        topic, consumer = unique(), unique("c")
        async with transport.subscribe(topic, consumer=consumer) as sub:
            await transport.publish(topic, "later")
            [first] = await collect(sub, 1)
            loop = asyncio.get_running_loop()
            nacked_at = loop.time()
            await sub.nack(first, delay=1.0)
            [second] = await collect(sub, 1, timeout=RECEIVE_TIMEOUT * 2)
            await sub.ack(second)
        assert second.id == first.id
        # Not a speed check: the delay is a lower bound the transport promised.
        assert loop.time() - nacked_at >= 0.9

    async def test_event_goes_to_dead_letter_after_max_deliveries(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        require(caps, "consumer_offsets")
        topic, consumer = unique(), unique("c")
        limit = max_deliveries(transport)
        dead = transport.subscribe(dead_letter_topic(topic), consumer=unique("dead"))
        await dead.start()
        async with transport.subscribe(topic, consumer=consumer) as sub:
            poison = await transport.publish(topic, {"poison": True})
            for _ in range(limit):
                [event] = await collect(sub, 1, timeout=RECEIVE_TIMEOUT * 2)
                assert event.id == poison.id
                await sub.nack(event)
            healthy = await transport.publish(topic, {"poison": False})
            [next_event] = await collect(sub, 1, timeout=RECEIVE_TIMEOUT * 2)
            await sub.ack(next_event)
            assert next_event.id == healthy.id, "the poison event was delivered again"
            assert sub.stats.dead_lettered == 1
        [buried] = await collect(dead, 1, timeout=RECEIVE_TIMEOUT * 2)
        await dead.ack(buried)
        await dead.close()
        assert buried.topic == dead_letter_topic(topic) == f"dead:{topic}"
        assert buried.payload == {"poison": True}
        # The same headers on every transport (alkpubsub.deadletter).
        assert buried.headers["x-original-id"] == poison.id
        assert buried.headers["x-original-topic"] == topic
        assert buried.headers["x-deliveries"] == str(limit)
        assert buried.headers["x-dead-kind"] == "event"
        assert buried.headers["x-consumer"] == consumer
        assert buried.headers["x-dead-reason"]

    async def test_a_handler_that_always_fails_leaves_one_dead_letter_per_event(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        # The README's own shape: a consumer on 'orders:>' whose handler fails.
        # Its dead letters must not come back to it, nor be dead-lettered again.
        require(caps, "dead_letter")
        base, consumer = unique("orders"), unique("c")
        limit = max_deliveries(transport)
        async with (
            transport.subscribe(f"{base}:>", consumer=consumer) as sub,
            transport.subscribe(f"dead:{base}:>", consumer=unique("ops")) as dead,
        ):
            sent = [await transport.publish(f"{base}:e{i}", i) for i in range(3)]
            deliveries = 0
            while True:
                try:
                    event = await sub.get(timeout=QUIET * 5)
                except TimeoutError:
                    break
                assert not event.topic.startswith("dead:"), "a consumer got its dead letter"
                deliveries += 1
                assert deliveries <= 3 * limit, f"{deliveries} deliveries for 3 events"
                await sub.nack(event, reason="handler failed: boom")
            assert deliveries == 3 * limit
            buried = await collect(dead, 3, timeout=RECEIVE_TIMEOUT * 2)
            for letter in buried:
                await dead.ack(letter)
            await nothing_more(dead, QUIET * 3)
        assert sorted(b.headers["x-original-id"] for b in buried) == sorted(e.id for e in sent)
        assert {b.topic for b in buried} == {f"dead:{e.topic}" for e in sent}
        assert all("boom" in b.headers["x-dead-reason"] for b in buried)

    async def test_start_earliest_new_and_offset(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        require(caps, "consumer_offsets")
        topic = unique()
        old = [await transport.publish(topic, i) for i in range(5)]
        async with (
            transport.subscribe(topic, consumer=unique("c"), start="earliest") as earliest,
            transport.subscribe(topic, consumer=unique("c"), start="new") as new,
        ):
            replay = await collect_acking(earliest, 5)
            assert [e.id for e in replay] == [e.id for e in old]
            assert all(e.offset is not None for e in replay)
            offsets = [e.offset or 0 for e in replay]
            assert offsets == sorted(offsets) and len(set(offsets)) == 5
            fresh = await transport.publish(topic, "fresh")
            [only] = await collect_acking(new, 1)
            assert only.id == fresh.id
        third = replay[2].offset
        assert third is not None
        async with transport.subscribe(topic, consumer=unique("c"), start=third) as at:
            got = await collect_acking(at, 4)
        assert [e.id for e in got] == [e.id for e in old[2:]] + [fresh.id]

    async def test_saved_position_wins_over_start(
        self, connect: TransportFactory, transport: Transport, caps: Capabilities
    ) -> None:
        require(caps, "consumer_offsets")
        topic, consumer = unique(), unique("c")
        async with transport.subscribe(topic, consumer=consumer, start="earliest") as sub:
            for i in range(3):
                await transport.publish(topic, i)
            await collect_acking(sub, 3)
        later = await transport.publish(topic, "after")
        other = await connect()
        async with other.subscribe(topic, consumer=consumer, start="earliest") as sub2:
            [got] = await collect_acking(sub2, 1)
            await nothing_more(sub2)
        assert got.id == later.id

    async def test_two_consumer_names_each_get_everything(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        require(caps, "consumer_offsets")
        topic = unique()
        async with (
            transport.subscribe(topic, consumer=unique("a")) as a,
            transport.subscribe(topic, consumer=unique("b")) as b,
        ):
            sent = {(await transport.publish(topic, i)).id for i in range(50)}
            assert {e.id for e in await collect_acking(a, 50)} == sent
            assert {e.id for e in await collect_acking(b, 50)} == sent

    async def test_same_consumer_name_shares_work_or_is_busy(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        require(caps, "consumer_offsets")
        topic, consumer = unique(), unique("c")
        first = transport.subscribe(topic, consumer=consumer)
        await first.start()
        second = transport.subscribe(topic, consumer=consumer)
        if not caps.competing_consumers:
            with pytest.raises(ConsumerBusy) as info:
                await second.start()
            assert consumer in str(info.value)
            await first.close()
            # Once the first is gone, the name is free again.
            async with transport.subscribe(topic, consumer=consumer) as third:
                one = await transport.publish(topic, "x")
                [got] = await collect_acking(third, 1)
                assert got.id == one.id
            return
        await second.start()
        sent = {(await transport.publish(topic, i)).id for i in range(200)}
        seen: dict[str, int] = {}

        async def drain(sub_index: int) -> None:
            sub = (first, second)[sub_index]
            while len(seen) < len(sent):
                try:
                    event = await sub.get(timeout=0.5)
                except TimeoutError:
                    continue
                await sub.ack(event)
                seen[event.id] = seen.get(event.id, 0) + 1

        await asyncio.wait_for(asyncio.gather(drain(0), drain(1)), RECEIVE_TIMEOUT * 3)
        assert set(seen) == sent
        assert first.stats.delivered > 0 and second.stats.delivered > 0, (
            f"work was not shared: {first.stats.delivered} / {second.stats.delivered}"
        )
        await first.close()
        await second.close()

    async def test_full_buffer_pauses_reading_and_loses_nothing(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        require(caps, "consumer_offsets")
        topic = unique()
        async with transport.subscribe(topic, consumer=unique("c"), buffer=5) as sub:
            sent = await transport.publish_many([(topic, i) for i in range(300)])
            await asyncio.sleep(0.2)
            assert sub.buffered <= 5
            got = await collect_acking(sub, 300, timeout=RECEIVE_TIMEOUT * 3)
            assert sub.stats.dropped == 0
        if caps.ordered:
            assert [e.id for e in got] == [e.id for e in sent]
        else:
            assert {e.id for e in got} == {e.id for e in sent}

    async def test_durable_pattern_subscription_sees_only_matching_topics(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        require(caps, "consumer_offsets")
        base = unique()
        pattern = f"{base}:*" if caps.wildcards else f"{base}:yes"
        async with transport.subscribe(pattern, consumer=unique("c"), start="earliest") as sub:
            await transport.publish(f"{base}:yes", 1)
            await transport.publish(f"{base}x:no", 2)
            await transport.publish(f"{base}:yes:no", 3)
            await transport.publish(f"{base}:yes", 4)
            got = await collect_acking(sub, 2)
            await nothing_more(sub)
        assert [e.payload for e in got] == [1, 4]

    async def test_bad_start_is_refused(self, transport: Transport, caps: Capabilities) -> None:
        require(caps, "consumer_offsets")
        for bad in ("latest", -1, 1.5):
            with pytest.raises(ConfigError, match="start"):
                transport.subscribe(unique(), consumer="c1", start=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="consumer"):
            transport.subscribe(unique(), consumer="bad name")
