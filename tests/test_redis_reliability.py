"""Redis pub/sub under stress (alkpubsub issue 7): concurrent subscribes and
closes, overlapping server-side subscriptions, a burst of large messages to an
application that does not read, subscribing through an outage.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from brokers import RedisServer

import alkpubsub
from alkpubsub.conformance import unique
from alkpubsub.conformance.restart import wait_until
from alkpubsub.transport import Subscription
from alkpubsub.transports.redis import RedisTransport

ENTER_TIMEOUT = 10  # a live server confirms a SUBSCRIBE in well under 100 ms


@pytest.fixture
async def transport(redis_server_session: RedisServer) -> AsyncIterator[RedisTransport]:
    t = await alkpubsub.connect(f"{redis_server_session.url}?prefix={unique('p')}:")
    assert isinstance(t, RedisTransport)
    yield t
    await t.close()


async def enter_all(subs: list[Subscription]) -> None:
    """Enter every subscription concurrently, each within ENTER_TIMEOUT."""
    async with asyncio.timeout(ENTER_TIMEOUT):
        await asyncio.gather(*(sub.start() for sub in subs))


async def each_receives(subs: list[Subscription], event_id: str) -> None:
    for sub in subs:
        assert (await sub.get(5)).id == event_id, sub


# -- concurrent __aenter__ -------------------------------------------------------


async def test_concurrent_subscriptions_to_one_wildcard_are_live_on_entry(
    transport: RedisTransport,
) -> None:
    base = unique()
    subs = [transport.subscribe(f"{base}:>") for _ in range(8)]
    await enter_all(subs)
    sent = await transport.publish(f"{base}:x", "to all eight")
    await each_receives(subs, sent.id)
    for sub in subs:
        await sub.close()


async def test_concurrent_subscriptions_to_distinct_patterns_are_live_on_entry(
    transport: RedisTransport,
) -> None:
    base = unique()
    patterns = [f"{base}:{i}:>" for i in range(4)] + [f"{base}:{i}:x" for i in range(4)]
    subs = [transport.subscribe(p) for p in patterns]
    await enter_all(subs)
    for i in range(4):
        sent = await transport.publish(f"{base}:{i}:x", i)
        await each_receives([subs[i], subs[4 + i]], sent.id)
    for sub in subs:
        await sub.close()


async def test_concurrent_subscriptions_to_exact_topics_are_live_on_entry(
    transport: RedisTransport,
) -> None:
    base = unique()
    subs = [transport.subscribe(f"{base}:{i % 3}") for i in range(9)]
    await enter_all(subs)
    for i in range(3):
        sent = await transport.publish(f"{base}:{i}", i)
        await each_receives(subs[i::3], sent.id)
    for sub in subs:
        await sub.close()


async def test_subscribing_while_others_close_leaves_the_new_ones_live(
    transport: RedisTransport,
) -> None:
    # Closing the last subscriber of a pattern sends UNSUBSCRIBE; a new
    # subscriber arriving meanwhile must not take the old confirmation for its
    # own and then sit on a channel the server has just dropped.
    topic = f"{unique()}:x"
    for round_ in range(20):
        old = [transport.subscribe(topic), transport.subscribe(f"{topic[:-2]}:*")]
        await enter_all(old)
        new = [transport.subscribe(topic), transport.subscribe(f"{topic[:-2]}:*")]
        async with asyncio.timeout(ENTER_TIMEOUT):
            await asyncio.gather(*(s.close() for s in old), *(s.start() for s in new))
        sent = await transport.publish(topic, round_)
        await each_receives(new, sent.id)
        for sub in new:
            await sub.close()


# -- one copy of each message on the connection ----------------------------------


def numsub(server: RedisServer, channel: str) -> int:
    reply = server.call("PUBSUB", "NUMSUB", channel)
    assert isinstance(reply, list) and isinstance(reply[1], int)
    return reply[1]


def numpat(server: RedisServer) -> int:
    count = server.call("PUBSUB", "NUMPAT")
    assert isinstance(count, int)
    return count


def bytes_sent(server: RedisServer) -> int:
    """Bytes the server has written to all its clients so far."""
    info = server.call("INFO", "stats")
    assert isinstance(info, bytes)
    for line in info.decode().splitlines():
        if line.startswith("total_net_output_bytes:"):
            return int(line.split(":")[1])
    raise AssertionError("no total_net_output_bytes in INFO stats")


async def test_covered_channels_and_globs_are_not_held_twice(redis_server: RedisServer) -> None:
    transport = await alkpubsub.connect(f"{redis_server.url}?prefix=app:")
    base = unique()
    async with (
        transport.subscribe(f"{base}:x") as exact,
        transport.subscribe(f"{base}:y:*") as deeper,
        transport.subscribe(f"{base}:>") as wide,
    ):
        # "base:*" covers the channel "base:x" and the glob "base:y:*": held as
        # well, a message would reach the connection two or three times.
        await wait_until(
            lambda: numpat(redis_server) == 1 and numsub(redis_server, f"app:{base}:x") == 0,
            5,
            "only the widest glob held",
        )
        big = "x" * 500_000
        before = bytes_sent(redis_server)
        sent = await transport.publish(f"{base}:y:x", big)
        for sub in (deeper, wide):
            assert (await sub.get(5)).id == sent.id
        # Once to the subscriber (plus the publisher's small reply), not twice.
        assert bytes_sent(redis_server) - before < 1.5 * len(big)
        one = await transport.publish(f"{base}:x", "once")
        assert (await exact.get(5)).id == one.id and (await wide.get(5)).id == one.id
        for sub in (exact, deeper, wide):
            with pytest.raises(TimeoutError):
                await sub.get(0.2)
        await wide.close()
        # Without the wide glob the narrower subscriptions are held again.
        await wait_until(
            lambda: numsub(redis_server, f"app:{base}:x") == 1 and numpat(redis_server) == 1,
            5,
            "channel and narrower glob held again",
        )
        two = await transport.publish(f"{base}:y:z", "two")
        assert (await deeper.get(5)).id == two.id
    await transport.close()


async def test_no_event_lost_or_doubled_while_covering_globs_come_and_go(
    transport: RedisTransport, redis_server_session: RedisServer
) -> None:
    # Switching a channel's subscriber to a covering glob (and back) must
    # neither drop what is published during the switch nor deliver it twice.
    base = unique()
    topic = f"{base}:x"
    publisher = await alkpubsub.connect(
        f"{redis_server_session.url}?prefix={transport.options.prefix}"
    )
    async with transport.subscribe(topic, buffer=1_000_000) as exact:
        stop = asyncio.Event()

        async def publish() -> int:
            n = 0
            while not stop.is_set():
                await publisher.publish(topic, n)
                n += 1
            return n

        task = asyncio.create_task(publish())
        for _ in range(10):
            async with transport.subscribe(f"{base}:*"), transport.subscribe(">"):
                await asyncio.sleep(0.02)  # let events flow through the globs
            await asyncio.sleep(0.02)  # and through the channel again
        stop.set()
        count = await asyncio.wait_for(task, 5)
        got = [(await exact.get(5)).payload for _ in range(count)]
        assert got == list(range(count))
        with pytest.raises(TimeoutError):
            await exact.get(0.2)
    await publisher.close()


# -- a burst of large messages to an application that does not read -------------


async def test_burst_of_largest_messages_to_a_slow_application_keeps_the_connection(
    transport: RedisTransport, redis_server_session: RedisServer
) -> None:
    # 64 x 1 MB is twice Redis's 32 MB hard limit for a pub/sub client's
    # output buffer: the reader must keep draining the socket into the bounded
    # buffer (dropping the oldest) while the application reads nothing.
    topic = unique()
    publisher = await alkpubsub.connect(
        f"{redis_server_session.url}?prefix={transport.options.prefix}"
    )
    payload = "x" * (transport.max_payload_bytes - 2)  # the JSON string's quotes
    async with transport.subscribe(topic, buffer=8) as sub:
        for _ in range(8):
            await publisher.publish_many([(topic, payload)] * 8)
        await wait_until(lambda: sub.stats.dropped + sub.buffered >= 64, 30, "burst drained")
        assert sub.stats.reconnects == 0
        after = await publisher.publish(topic, "small")
        # It pushes out the oldest of the eight kept: 57 dropped in all.
        await wait_until(lambda: sub.stats.dropped == 64 + 1 - 8, 5, "the small event")
        got = [await sub.get(5) for _ in range(8)]
        assert got[-1].id == after.id
        assert sub.stats.reconnects == 0
    await publisher.close()


# -- mixed load ------------------------------------------------------------------


async def test_many_overlapping_subscriptions_entered_and_closed_at_once_get_each_event_once(
    transport: RedisTransport,
) -> None:
    # Channels, globs covering them and globs covering those, all entered (and
    # some closed) at once: every survivor gets exactly what its pattern
    # matches, once each, in publish order.
    base = unique()
    shapes = ["{b}:a", "{b}:a:b", "{b}:*", "{b}:>", ">", "{b}:a:*", "{b}:a:>", "*:a", "{b}:*:b"]
    rng = random.Random(3)
    keep = [transport.subscribe(rng.choice(shapes).format(b=base)) for _ in range(60)]
    drop = [transport.subscribe(rng.choice(shapes).format(b=base)) for _ in range(30)]
    await enter_all(drop)
    async with asyncio.timeout(ENTER_TIMEOUT):
        await asyncio.gather(*(s.start() for s in keep), *(s.close() for s in drop))
    topics = [f"{base}:a", f"{base}:a:b", f"{base}:c", f"{base}:a:b:c", f"{base}:c:b"]
    sent = [await transport.publish(t, t) for t in topics for _ in range(3)]
    for sub in keep:
        expected = [e.id for e in sent if sub.pattern.matches(e.topic)]
        got = [(await sub.get(5)).id for _ in expected]
        assert got == expected, sub
    for sub in keep[:5]:
        with pytest.raises(TimeoutError):
            await sub.get(0.2)
    for sub in keep:
        await sub.close()


async def test_subscriptions_entered_during_an_outage_are_live_when_it_ends(
    redis_server: RedisServer,
) -> None:
    transport = await alkpubsub.connect(redis_server.url)
    base = unique()
    async with transport.subscribe(f"{base}:x") as first:
        redis_server.stop()
        later = [transport.subscribe(p) for p in (f"{base}:x", f"{base}:*", f"{base}:>", ">")]
        entering = asyncio.gather(*(s.start() for s in later))
        await asyncio.sleep(0.2)  # they wait for the server, none returns early
        assert not entering.done()
        await asyncio.to_thread(redis_server.start)
        async with asyncio.timeout(ENTER_TIMEOUT):
            await entering
        sent = await transport.publish(f"{base}:x", "after")
        await each_receives([first, *later], sent.id)
        assert first.stats.reconnects == 1
        for sub in later:
            await sub.close()
    await transport.close()
