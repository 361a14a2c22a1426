"""Redis, contract v2: messages other programs write (adopted, dead-lettered
or dropped by ``foreign=``), topic spoofing, and dead letters at ``dead:<topic>``.

Every foreign message is written with raw redis-py, as another program would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from brokers import RedisServer
from redis_garbage import envelope

import alkpubsub
from alkpubsub import ConfigError, Event
from alkpubsub.conformance import collect, collect_acking, nothing_more, unique
from alkpubsub.transports._redis_common import id_to_offset
from alkpubsub.transports.redis import RedisTransport
from alkpubsub.transports.redis_durable import RedisDurableTransport

QUIET = 0.3  # s without an event before "nothing more" is believed


def durable_url(server: RedisServer, stream: str, **options: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"stream": stream, **options}.items())
    return f"{server.url.replace('redis://', 'redis+durable://')}?{query}"


@pytest.fixture
async def raw(redis_server_session: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server_session.url)
    yield client
    await client.aclose()


@pytest.fixture
async def pubsub(redis_server_session: RedisServer) -> AsyncIterator[RedisTransport]:
    t = await alkpubsub.connect(f"{redis_server_session.url}?prefix={unique('p')}:")
    assert isinstance(t, RedisTransport)
    yield t
    await t.close()


@pytest.fixture
def stream() -> str:
    return unique("S")


@pytest.fixture
async def durable(
    redis_server_session: RedisServer, stream: str
) -> AsyncIterator[RedisDurableTransport]:
    t = await alkpubsub.connect(durable_url(redis_server_session, stream, claim_idle=0.5))
    assert isinstance(t, RedisDurableTransport)
    yield t
    await t.close()


# -- topic spoofing --------------------------------------------------------------


async def test_topic_spoofing_is_refused_on_pub_sub(
    pubsub: RedisTransport, raw: aioredis.Redis
) -> None:
    # A raw client sends, on channel graph:created, an envelope for secret:payroll.
    base = unique("graph")
    async with pubsub.subscribe(f"{base}:*") as sub:
        spoof = json.dumps(envelope("secret:payroll")).encode()
        await raw.publish(f"{pubsub.options.prefix}{base}:created", spoof)
        # The same as a CloudEvent whose topic extension names another topic.
        ce = {"specversion": "1.0", "id": "1", "source": "/x", "type": "t", "topic": "secret:pay"}
        await raw.publish(f"{pubsub.options.prefix}{base}:created", json.dumps(ce))
        await nothing_more(sub, QUIET)
        assert sub.stats.malformed == 2


async def test_topic_spoofing_is_refused_on_streams(
    durable: RedisDurableTransport, raw: aioredis.Redis, stream: str
) -> None:
    base = unique("graph")
    async with durable.subscribe(f"{base}:*", consumer=unique("c")) as sub:
        spoof = json.dumps(envelope("secret:payroll"))
        await raw.xadd(stream, {"topic": f"{base}:created", "event": spoof})
        await raw.xadd(stream, {"topic": f"{base}:created", "data": spoof})
        good = await durable.publish(f"{base}:created", "fine")
        [got] = await collect_acking(sub, 1)
        assert got.id == good.id
        assert sub.stats.malformed == 2
        assert sub.stats.dead_lettered == 2  # a named consumer keeps them, at dead:<topic>


# -- foreign messages on pub/sub ---------------------------------------------------


async def test_foreign_messages_on_pub_sub_are_adopted(
    pubsub: RedisTransport, raw: aioredis.Redis
) -> None:
    topic = unique("orders")
    channel = pubsub.options.prefix + topic
    async with pubsub.subscribe(topic) as sub:
        await raw.publish(channel, b'{"order": 7}')
        await raw.publish(channel, b"plain text, not JSON")
        await raw.publish(channel, b'{"order": 7}')  # the same message again
        await raw.publish(channel, b"1" * 30)  # JSON beyond the limits (30 digits): its text
        got = await collect(sub, 4)
    want = [{"order": 7}, "plain text, not JSON", {"order": 7}, "1" * 30]
    assert [e.payload for e in got] == want
    assert [e.headers["x-alk-foreign"] for e in got] == ["json", "text", "json", "text"]
    assert {e.topic for e in got} == {topic}
    assert {e.origin for e in got} == {"foreign"}
    assert got[0].id == got[2].id != got[1].id  # channel + body: the same id
    assert sub.stats.malformed == 0


async def test_an_adopted_message_can_be_published_again(
    pubsub: RedisTransport, raw: aioredis.Redis
) -> None:
    # The other direction: what alkpubsub adopted, a raw reader gets as our envelope.
    topic = unique("orders")
    listener = raw.pubsub()
    await listener.subscribe(pubsub.options.prefix + topic)
    async with pubsub.subscribe(topic) as sub:
        await raw.publish(pubsub.options.prefix + topic, b'{"order": 7}')
        [adopted] = await collect(sub, 1)
        await pubsub.forward(adopted)
        await collect(sub, 1)
    bodies: list[bytes] = []
    async with asyncio.timeout(5):
        while len(bodies) < 2:
            message = await listener.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                bodies.append(message["data"])
    await listener.aclose()
    again = Event.from_json(bodies[1])
    assert (again.id, again.payload, again.origin) == (adopted.id, {"order": 7}, "foreign")
    assert again.headers == {"x-alk-foreign": "json"}


async def test_foreign_drop_counts_and_drops(redis_server_session: RedisServer) -> None:
    prefix = f"{unique('p')}:"
    t = await alkpubsub.connect(f"{redis_server_session.url}?prefix={prefix}&foreign=drop")
    topic = unique()
    try:
        async with t.subscribe(topic) as sub:
            redis_server_session.call("PUBLISH", prefix + topic, '{"order": 7}')
            good = await t.publish(topic, "ours")
            [got] = await collect(sub, 1)
            assert got.id == good.id
            assert sub.stats.malformed == 1
    finally:
        await t.close()


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://localhost?foreign=keep", "foreign"),
        ("redis://localhost?foreign=dead_letter", "foreign=dead_letter"),
        ("redis://localhost?format=cloudevents-binary", "format=cloudevents"),
        ("redis://localhost?format=xml", "format"),
        ("redis+durable://localhost?foreign=keep", "foreign"),
        ("redis+durable://localhost?format=xml", "format"),
    ],
)
async def test_bad_foreign_and_format_options_are_refused(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        await alkpubsub.connect(url)


# -- foreign entries on Streams ----------------------------------------------------


async def test_foreign_entries_are_adopted_by_the_documented_rule(
    durable: RedisDurableTransport, raw: aioredis.Redis, stream: str
) -> None:
    topic = unique("orders")
    async with (
        durable.subscribe(topic, consumer=unique("c"), start="earliest") as sub,
        durable.subscribe(stream, consumer=unique("c"), start="earliest") as on_stream,
    ):
        ids = [
            await raw.xadd(stream, {"topic": topic, "order": "7", "qty": "2"}),
            await raw.xadd(stream, {"topic": topic, "data": '{"n": 1}'}),
            await raw.xadd(stream, {"topic": topic, "payload": "hello"}),
            await raw.xadd(stream, {"order": "8"}),  # no topic: the stream key is the topic
        ]
        got = await collect_acking(sub, 3)
        [keyless] = await collect_acking(on_stream, 1)
    assert [e.payload for e in got] == [{"order": "7", "qty": "2"}, {"n": 1}, "hello"]
    assert [e.headers["x-alk-foreign"] for e in got] == ["json", "json", "text"]
    assert (keyless.topic, keyless.payload) == (stream, {"order": "8"})
    for event, entry_id in zip([*got, keyless], ids, strict=True):
        assert event.origin == "foreign"
        assert event.offset == id_to_offset(entry_id)
        ms = int(entry_id.split(b"-")[0])
        assert int(event.published_at.timestamp() * 1000) == ms  # the entry's own time
    assert sub.stats.malformed == 0


async def test_a_foreign_entry_survives_a_restart_of_its_named_consumer(
    redis_server_session: RedisServer, raw: aioredis.Redis, stream: str
) -> None:
    # Never may a named consumer move past an entry it neither delivered nor dead-lettered.
    url = durable_url(redis_server_session, stream)
    topic, consumer = unique("orders"), unique("c")
    first = await alkpubsub.connect(url)
    async with first.subscribe(topic, consumer=consumer, start="earliest") as sub:
        await raw.xadd(stream, {"topic": topic, "order": "7"})
        [seen] = await collect(sub, 1)  # delivered, never acked: the process "dies"
    await first.close()
    again = await alkpubsub.connect(url)
    async with again.subscribe(topic, consumer=consumer) as sub2:
        [redelivered] = await collect_acking(sub2, 1)
        assert redelivered.id == seen.id  # the same id: deduplicable
        assert redelivered.payload == {"order": "7"}
        await nothing_more(sub2, QUIET)
    await again.close()
    third = await alkpubsub.connect(url)
    async with third.subscribe(topic, consumer=consumer) as sub3:
        await nothing_more(sub3, QUIET)  # acked: never again
    await third.close()


async def test_foreign_dead_letter_sends_foreign_entries_to_the_dead_letter_topic(
    redis_server_session: RedisServer, raw: aioredis.Redis, stream: str
) -> None:
    t = await alkpubsub.connect(durable_url(redis_server_session, stream, foreign="dead_letter"))
    topic = unique("orders")
    try:
        async with (
            t.subscribe(topic, consumer=unique("c")) as sub,
            t.subscribe(f"dead:{topic}", consumer=unique("ops")) as dead,
        ):
            await raw.xadd(stream, {"topic": topic, "order": "7"})
            good = await t.publish(topic, "ours")
            [got] = await collect_acking(sub, 1)
            assert got.id == good.id
            [letter] = await collect_acking(dead, 1)
        assert letter.payload == {"order": "7"}
        assert letter.headers["x-alk-foreign"] == "json"
        assert letter.headers["x-original-topic"] == topic
        assert "foreign" in letter.headers["x-dead-reason"]
        assert sub.stats.dead_lettered == 1
    finally:
        await t.close()


async def test_foreign_drop_on_streams_counts_and_acks(
    redis_server_session: RedisServer, raw: aioredis.Redis, stream: str
) -> None:
    t = await alkpubsub.connect(durable_url(redis_server_session, stream, foreign="drop"))
    topic, consumer = unique("orders"), unique("c")
    try:
        async with t.subscribe(topic, consumer=consumer) as sub:
            await raw.xadd(stream, {"topic": topic, "order": "7"})
            good = await t.publish(topic, "ours")
            [got] = await collect_acking(sub, 1)
            assert got.id == good.id
            assert sub.stats.malformed == 1
    finally:
        await t.close()
    assert await raw.xpending(stream, consumer) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


# -- dead letters at dead:<topic> ----------------------------------------------------


async def test_a_wildcard_group_skips_dead_letters_silently(
    durable: RedisDurableTransport, raw: aioredis.Redis, stream: str
) -> None:
    # The stream holds dead letters beside events; '>' reads the stream but
    # does not match them: acked unseen, not malformed.
    topic = unique("orders")
    async with durable.subscribe(topic, consumer=unique("c")) as sub:
        poison = await durable.publish(topic, "poison")
        for _ in range(durable.max_deliveries):
            [event] = await collect(sub, 1)
            await sub.nack(event, reason="handler failed")
    assert any(
        fields.get(b"topic") == f"dead:{topic}".encode() for _, fields in await raw.xrange(stream)
    ), "no dead letter was written"
    async with durable.subscribe(">", consumer=unique("all"), start="earliest") as everything:
        [only] = await collect_acking(everything, 1)
        assert only.id == poison.id
        await nothing_more(everything, QUIET)
        assert everything.stats.malformed == 0
        assert everything.stats.dead_lettered == 0


async def test_a_dead_letter_that_keeps_failing_is_redelivered_not_dead_lettered_again(
    durable: RedisDurableTransport, raw: aioredis.Redis, stream: str
) -> None:
    topic = unique("orders")
    limit = durable.max_deliveries
    async with (
        durable.subscribe(topic, consumer=unique("c")) as sub,
        durable.subscribe(f"dead:{topic}", consumer=unique("ops")) as dead,
    ):
        await durable.publish(topic, "poison")
        for _ in range(limit):
            [event] = await collect(sub, 1)
            await sub.nack(event)
        letters = []
        for _ in range(limit + 2):  # more failures than any event is allowed
            [letter] = await collect(dead, 1)
            letters.append(letter)
            await dead.nack(letter, reason="still broken")
        assert len({letter.id for letter in letters}) == 1
        assert dead.stats.dead_lettered == 0
        assert dead.stats.redelivered == limit + 1
    topics = [fields.get(b"topic") for _, fields in await raw.xrange(stream)]
    assert topics.count(f"dead:{topic}".encode()) == 1
    assert not any(t and t.startswith(b"dead:dead:") for t in topics)


async def test_nack_reason_is_the_dead_letters_reason(
    durable: RedisDurableTransport,
) -> None:
    topic, consumer = unique("orders"), unique("c")
    async with (
        durable.subscribe(topic, consumer=consumer) as sub,
        durable.subscribe(f"dead:{topic}", consumer=unique("ops")) as dead,
    ):
        sent = await durable.publish(topic, {"n": 1}, headers={"traceparent": "00-abc"})
        for attempt in range(durable.max_deliveries):
            [event] = await collect(sub, 1)
            await sub.nack(event, reason=f"attempt {attempt}: boom")
        [letter] = await collect_acking(dead, 1)
    assert letter.headers["x-dead-reason"] == f"attempt {durable.max_deliveries - 1}: boom"
    assert letter.headers["x-dead-kind"] == "event"
    assert letter.headers["x-consumer"] == consumer
    assert letter.headers["x-original-id"] == sent.id
    assert letter.headers["x-original-offset"] == str(sent.offset)
    assert letter.headers["traceparent"] == "00-abc"  # the original's headers are kept


async def test_foreign_dead_letter_never_chains_on_dead_letter_topics(
    redis_server_session: RedisServer, raw: aioredis.Redis, stream: str
) -> None:
    # A foreign entry written to a dead-letter topic cannot go to a dead-letter
    # topic again: the ops consumer counts it and moves on.
    t = await alkpubsub.connect(durable_url(redis_server_session, stream, foreign="dead_letter"))
    topic = f"dead:{unique('orders')}"
    try:
        async with t.subscribe(topic, consumer=unique("ops")) as ops:
            await raw.xadd(stream, {"topic": topic, "order": "7"})
            await nothing_more(ops, QUIET)
            assert (ops.stats.malformed, ops.stats.dead_lettered) == (1, 0)
    finally:
        await t.close()
    assert [f[b"topic"] for _, f in await raw.xrange(stream)] == [topic.encode()]


@pytest.mark.parametrize("fmt", ["cloudevents", "cloudevents-binary"])
async def test_dead_letters_round_trip_in_every_write_format(
    redis_server_session: RedisServer, stream: str, fmt: str
) -> None:
    # Dead letters are written in the transport's format and read back whole.
    t = await alkpubsub.connect(durable_url(redis_server_session, stream, format=fmt))
    assert isinstance(t, RedisDurableTransport)
    topic, consumer = unique("orders"), unique("c")
    try:
        async with (
            t.subscribe(topic, consumer=consumer) as sub,
            t.subscribe(f"dead:{topic}", consumer=unique("ops")) as dead,
        ):
            sent = await t.publish(topic, {"n": 1})
            for _ in range(t.max_deliveries):
                [event] = await collect(sub, 1)
                await sub.nack(event, reason="boom")
            [letter] = await collect_acking(dead, 1)
    finally:
        await t.close()
    assert (letter.topic, letter.payload) == (f"dead:{topic}", {"n": 1})
    assert letter.headers["x-dead-reason"] == "boom"
    assert letter.headers["x-original-id"] == sent.id
    assert letter.headers["x-consumer"] == consumer
