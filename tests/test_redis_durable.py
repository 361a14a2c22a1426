"""Redis Streams transport: what the conformance suite does not cover.

Entry layout and offsets, trimming, the group bookkeeping behind claim, nack
and close, malformed entries and outages, against real ``redis-server``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from brokers import RedisServer
from redis_garbage import add_garbage, foreign_entries

import alkpubsub
from alkpubsub import ConfigError, ConnectionLost, Event, Settings
from alkpubsub.conformance import collect, collect_acking, nothing_more, unique
from alkpubsub.topics import dead_letter_topic
from alkpubsub.transports._redis_common import id_to_offset, offset_to_id
from alkpubsub.transports.redis_durable import RedisDurableTransport


def durable_url(server: RedisServer, stream: str, **options: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"stream": stream, **options}.items())
    return f"{server.url.replace('redis://', 'redis+durable://')}?{query}"


@pytest.fixture
def stream() -> str:
    return unique("S")


@pytest.fixture
async def transport(
    redis_server_session: RedisServer, stream: str
) -> AsyncIterator[RedisDurableTransport]:
    t = await alkpubsub.connect(durable_url(redis_server_session, stream, claim_idle=0.5))
    assert isinstance(t, RedisDurableTransport)
    yield t
    await t.close()


def entries(server: RedisServer, stream: str) -> list[Any]:
    reply = server.call("XRANGE", stream, "-", "+")
    assert isinstance(reply, list)
    return reply


def pending(server: RedisServer, stream: str, group: str) -> list[Any]:
    """XPENDING rows: [id, consumer, idle ms, deliveries]."""
    reply = server.call("XPENDING", stream, group, "-", "+", 1000)
    assert isinstance(reply, list)
    return reply


async def test_offset_packs_the_entry_id_and_entries_hold_topic_and_envelope(
    redis_server_session: RedisServer, transport: RedisDurableTransport, stream: str
) -> None:
    first = await transport.publish("orders:created", {"n": 1}, headers={"trace": "t1"})
    batch = await transport.publish_many([("orders:created", {"n": i}) for i in (2, 3)])
    rows = entries(redis_server_session, stream)
    assert len(rows) == 3
    entry_id, fields = rows[0]
    assert first.offset == id_to_offset(entry_id)
    assert offset_to_id(first.offset).encode() == entry_id
    stored = dict(zip(fields[::2], fields[1::2], strict=True))
    assert stored[b"topic"] == b"orders:created"
    assert Event.from_json(stored[b"event"]).id == first.id
    offsets = [first.offset, *(e.offset for e in batch)]
    assert offsets == sorted(offsets) and len(set(offsets)) == 3  # type: ignore[type-var]


async def test_maxlen_trims_the_stream_approximately(
    redis_server_session: RedisServer, stream: str
) -> None:
    transport = await alkpubsub.connect(durable_url(redis_server_session, stream, maxlen=100))
    await transport.publish_many([("t", i) for i in range(2000)])
    length = redis_server_session.call("XLEN", stream)
    # "~" trims whole radix-tree nodes (100 entries each): 100..200 remain, not 2000.
    assert isinstance(length, int) and 100 <= length <= 200
    await transport.close()


async def test_closing_hands_entries_back_without_charging_unseen_ones(
    redis_server_session: RedisServer, transport: RedisDurableTransport, stream: str
) -> None:
    topic, consumer = unique(), unique("c")
    async with transport.subscribe(topic, consumer=consumer) as sub:
        await transport.publish_many([(topic, i) for i in range(10)])
        [seen] = await collect(sub, 1)  # the other 9 wait in the buffer, unseen
        await asyncio.sleep(0.1)
    rows = pending(redis_server_session, stream, consumer)
    assert {row[1] for row in rows} == {b"alk.released"}  # the closed member is gone
    counts = {id_to_offset(row[0]): row[3] for row in rows}
    assert counts.pop(seen.offset) == 1  # seen once: that delivery counts
    assert set(counts.values()) == {0}  # never seen: no delivery charged
    members = redis_server_session.call("XINFO", "CONSUMERS", stream, consumer)
    assert isinstance(members, list) and len(members) == 1
    async with transport.subscribe(topic, consumer=consumer) as again:
        got = await collect_acking(again, 10)
        assert sorted(e.payload for e in got) == list(range(10))
        assert again.stats.redelivered == 1  # only the one the app had seen


async def test_crashed_members_entries_are_claimed_after_claim_idle(
    redis_server_session: RedisServer, transport: RedisDurableTransport, stream: str
) -> None:
    topic, consumer = unique(), unique("c")
    async with transport.subscribe(topic, consumer=consumer) as live:
        pass  # creates the group; its member leaves cleanly
    sent = await transport.publish_many([(topic, i) for i in range(5)])
    # A member that reads and then vanishes without a word (a crash).
    redis_server_session.call("XREADGROUP", "GROUP", consumer, "ghost", "STREAMS", stream, ">")
    assert len(pending(redis_server_session, stream, consumer)) == 5
    async with transport.subscribe(topic, consumer=consumer) as live:
        got = await collect_acking(live, 5)  # after claim_idle=0.5 s
        assert [e.id for e in got] == [e.id for e in sent]
        assert live.stats.redelivered == 5
    assert pending(redis_server_session, stream, consumer) == []


async def test_a_live_member_keeps_what_it_holds(transport: RedisDurableTransport) -> None:
    topic, consumer = unique(), unique("c")
    async with transport.subscribe(topic, consumer=consumer) as holder:
        sent = await transport.publish(topic, "mine")
        [held] = await collect(holder, 1)
        async with transport.subscribe(topic, consumer=consumer) as other:
            # Unacked for three claim_idle periods (0.5 s): the holder refreshes
            # the entry's idle time, so the other member never claims it.
            with pytest.raises(TimeoutError):
                await other.get(1.5)
        assert holder.stats.redelivered == 0
        await holder.ack(held)
    assert held.id == sent.id


async def test_nack_delay_longer_than_claim_idle_is_honoured(
    transport: RedisDurableTransport,
) -> None:
    topic = unique()
    async with transport.subscribe(topic, consumer=unique("c")) as sub:
        await transport.publish(topic, "later")
        [first] = await collect(sub, 1)
        loop = asyncio.get_running_loop()
        nacked_at = loop.time()
        await sub.nack(first, delay=1.2)  # claim_idle is 0.5 s
        [again] = await collect(sub, 1)
        await sub.ack(again)
    assert again.id == first.id
    assert loop.time() - nacked_at >= 1.1  # a lower bound the transport promised


async def test_malformed_entries_are_counted_and_dead_lettered(
    redis_server_session: RedisServer, transport: RedisDurableTransport, stream: str
) -> None:
    topic = unique()
    async with (
        transport.subscribe(topic, consumer=unique("c"), start="earliest") as sub,
        transport.subscribe(dead_letter_topic(topic), consumer=unique("d")) as dead,
    ):
        redis_server_session.call("XADD", stream, "*", "topic", topic, "event", "{garbage")
        # Foreign (no event field) and on the stream's own topic: not this group's.
        redis_server_session.call("XADD", stream, "*", "no-topic", "at all")
        good = await transport.publish(topic, "fine")
        [event] = await collect_acking(sub, 1)
        assert event.id == good.id
        assert sub.stats.malformed == 1  # the bad envelope
        [buried] = await collect_acking(dead, 1)
        assert buried.payload == "{garbage"
        assert buried.headers["x-dead-reason"].startswith("malformed")
        assert buried.headers["x-dead-kind"] == "malformed"
        assert buried.headers["x-original-topic"] == topic
        assert sub.stats.dead_lettered == 1


async def test_anonymous_subscription_reads_and_leaves_no_group(
    redis_server_session: RedisServer, transport: RedisDurableTransport, stream: str
) -> None:
    topic = unique()
    sent = await transport.publish(topic, "old")
    async with transport.subscribe(topic, start="earliest") as sub:
        [got] = await collect_acking(sub, 1)
        assert got.id == sent.id
        groups = redis_server_session.call("XINFO", "GROUPS", stream)
        assert isinstance(groups, list) and len(groups) == 1
    assert redis_server_session.call("XINFO", "GROUPS", stream) == []


async def test_subscription_raises_connection_lost_after_reconnect_timeout(
    redis_server: RedisServer,
) -> None:
    url = durable_url(redis_server, "events", reconnect_timeout=0.5)
    transport = await alkpubsub.connect(url)
    topic = unique()
    async with transport.subscribe(topic, consumer="c") as sub:
        redis_server.stop()
        with pytest.raises(ConnectionLost, match="unreachable"):
            await sub.get(10)
    redis_server.start()
    await transport.close()


async def test_group_position_survives_a_broker_restart(redis_server: RedisServer) -> None:
    url = durable_url(redis_server, "events")
    transport = await alkpubsub.connect(url)
    topic = unique()
    async with transport.subscribe(topic, consumer="c", start="earliest") as sub:
        await transport.publish_many([(topic, i) for i in range(4)])
        await collect_acking(sub, 4)
        await asyncio.sleep(0.1)  # let the batched XACK go out
        redis_server.restart()  # AOF keeps the stream, the group and its acks
        await transport.publish_many([(topic, i) for i in (4, 5)])
        after = await collect_acking(sub, 2)
        assert [e.payload for e in after] == [4, 5]
        assert sub.stats.reconnects == 1
        assert sub.stats.offline_ms > 0  # the time it could not read is recorded
        await asyncio.sleep(0.1)
    await transport.close()
    again = await alkpubsub.connect(url)
    async with again.subscribe(topic, consumer="c", start="earliest") as resumed:
        await nothing_more(resumed)  # every entry was acked before or after the restart
    await again.close()


async def test_max_deliveries_comes_from_settings_unless_the_url_says(
    redis_server_session: RedisServer,
) -> None:
    url = durable_url(redis_server_session, unique("S"))
    from_settings = await alkpubsub.connect(Settings.load(url=url, max_deliveries=2))
    from_url = await alkpubsub.connect(
        Settings.load(url=f"{url}&max_deliveries=7", max_deliveries=2)
    )
    assert getattr(from_settings, "max_deliveries", None) == 2
    assert getattr(from_url, "max_deliveries", None) == 7
    await from_settings.close()
    await from_url.close()


async def test_a_key_that_is_not_a_stream_is_refused(
    redis_server_session: RedisServer, stream: str
) -> None:
    redis_server_session.call("SET", stream, "a string")
    transport = await alkpubsub.connect(durable_url(redis_server_session, stream))
    with pytest.raises(ConfigError, match="stream"):
        await transport.subscribe("t", consumer="c").start()
    await transport.close()


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("stream=bad%20name", "stream"),
        ("maxlen=-1", "maxlen"),
        ("claim_idle=0", "claim_idle"),
        ("batch=0", "batch"),
        ("max_deliveries=0", "max_deliveries"),
    ],
)
async def test_bad_options_are_refused(query: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        await alkpubsub.connect(f"redis+durable://localhost:6379/0?{query}")


# -- garbage in the stream and large entries -----------------------------------


async def test_garbage_entries_never_block_the_group(
    redis_server_session: RedisServer, transport: RedisDurableTransport, stream: str
) -> None:
    topic = unique()
    url = redis_server_session.url
    async with (
        transport.subscribe(topic, consumer=unique("c"), start="earliest") as named,
        transport.subscribe(topic, start="earliest") as anonymous,
        transport.subscribe(dead_letter_topic(topic), consumer=unique("d")) as dead,
        transport.subscribe("dead:unknown", consumer=unique("d")) as unknown,
    ):
        written = await add_garbage(url, stream, topic)
        adopted = len(foreign_entries(topic))
        good = [await transport.publish(topic, i) for i in range(3)]
        for sub in (named, anonymous):
            got = await collect_acking(sub, adopted + 3)
            assert [e.id for e in got[adopted:]] == [e.id for e in good]
            assert all(e.origin == "foreign" for e in got[:adopted])
            assert sub.stats.malformed == written
            await nothing_more(sub)
        # A named consumer dead-letters every malformed entry it was given, under
        # its topic, or under dead:unknown when the entry names no valid topic (2).
        assert named.stats.dead_lettered == written
        assert anonymous.stats.dead_lettered == 0  # no consumer to dead-letter for
        buried = await collect_acking(dead, written - 2)
        lost = await collect_acking(unknown, 2)
        for letter in buried + lost:
            assert letter.headers["x-dead-reason"].startswith("malformed")
            assert letter.headers["x-dead-kind"] == "malformed"
            assert letter.headers["x-consumer"] == named.consumer
        await nothing_more(dead)
    assert pending(redis_server_session, stream, named.consumer or "") == []


async def test_largest_entry_is_delivered(transport: RedisDurableTransport) -> None:
    topic = unique()
    payload = "x" * 990_000  # the payload JSON just under the 1,000,000-byte limit
    async with transport.subscribe(topic, consumer=unique("c")) as sub:
        sent = await transport.publish(topic, payload)
        small = await transport.publish(topic, "small")
        got = await collect_acking(sub, 2)
        assert [e.id for e in got] == [sent.id, small.id]
        assert got[0].payload == payload


async def test_an_envelope_beyond_the_publish_limits_is_dead_lettered_not_delivered(
    redis_server_session: RedisServer, stream: str
) -> None:
    # Written around the publish checks by a raw client: 1e999999 reads as
    # infinity, which no transport could publish again, so readers refuse it.
    url = durable_url(redis_server_session, stream, max_deliveries=1)
    transport = await alkpubsub.connect(url)
    topic = unique()
    async with (
        transport.subscribe(topic, consumer=unique("c"), start="earliest") as sub,
        transport.subscribe(dead_letter_topic(topic), consumer=unique("d")) as dead,
    ):
        event, body = Event.create(topic, 1, origin="raw")
        raw = event.envelope(body).replace(b'"payload":1', b'"payload":1e999999')
        redis_server_session.call("XADD", stream, "*", "topic", topic, "event", raw)
        good = await transport.publish(topic, "fine")
        [after] = await collect_acking(sub, 1)
        assert after.id == good.id, "the unpublishable envelope was delivered"
        [buried] = await collect_acking(dead, 1)
        assert "1e999999" in str(buried.payload)
        assert sub.stats.malformed == 1
    await transport.close()
