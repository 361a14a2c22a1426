"""Redis transports and CloudEvents, both ways, against the CNCF ``cloudevents`` SDK.

(a) A transport with ``format=cloudevents`` (and ``cloudevents-binary`` on
Streams) publishes; raw redis-py reads what is on the wire; the SDK parses it.
(b) The SDK builds a CloudEvent; raw redis-py writes it; an alkpubsub
subscriber receives it, whatever its own ``format``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime

import pytest
import redis.asyncio as aioredis
from brokers import RedisServer
from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent, from_http

import alkpubsub
from alkpubsub import Event
from alkpubsub.conformance import collect, collect_acking, unique
from alkpubsub.transports._redis_common import id_to_offset

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
STRUCTURED = {"content-type": "application/cloudevents+json"}


@pytest.fixture
async def raw(redis_server_session: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server_session.url)
    yield client
    await client.aclose()


def durable_url(server: RedisServer, stream: str, fmt: str = "alkpubsub") -> str:
    return f"{server.url.replace('redis://', 'redis+durable://')}?stream={stream}&format={fmt}"


def assert_same(sdk: CloudEvent, sent: Event) -> None:
    """The SDK's reading of what alkpubsub wrote says what the event says."""
    assert sdk["id"] == sent.id
    assert sdk["type"] == sent.topic
    assert datetime.fromisoformat(sdk["time"].replace("Z", "+00:00")) == sent.published_at
    assert sdk.data == sent.payload
    assert sdk["traceparent"] == TRACEPARENT


def sdk_event(topic: str) -> CloudEvent:
    attributes = {
        "type": "com.example.order.created",
        "source": "https://example.com/orders",
        "datacontenttype": "application/json",
        "traceparent": TRACEPARENT,
    }
    return CloudEvent(attributes, {"order": 7, "lines": [1, 2]})


def assert_received(got: Event, sdk: CloudEvent, topic: str) -> None:
    assert got.id == sdk["id"]
    assert got.topic == topic  # the arrival topic, not the CloudEvent's type
    assert got.payload == {"order": 7, "lines": [1, 2]}
    assert got.headers["traceparent"] == TRACEPARENT
    assert got.headers["ce-type"] == "com.example.order.created"
    assert got.origin == "https://example.com/orders"


# -- (a) alkpubsub writes, the SDK reads ---------------------------------------------


async def test_pub_sub_structured_cloudevents_are_read_by_the_sdk(
    redis_server_session: RedisServer, raw: aioredis.Redis
) -> None:
    prefix = f"{unique('p')}:"
    url = f"{redis_server_session.url}?prefix={prefix}&format=cloudevents"
    topic = unique("orders")
    listener = raw.pubsub()
    await listener.subscribe(prefix + topic)
    async with await alkpubsub.connect(url) as t, t.subscribe(topic) as sub:
        sent = await t.publish(topic, {"n": 1}, headers={"traceparent": TRACEPARENT})
        [back] = await collect(sub, 1)  # and alkpubsub reads its own CloudEvents
    async with asyncio.timeout(5):
        message = None
        while message is None:
            message = await listener.get_message(ignore_subscribe_messages=True, timeout=1)
    await listener.aclose()
    assert_same(from_http(STRUCTURED, message["data"]), sent)
    assert (back.id, back.topic, back.payload) == (sent.id, topic, {"n": 1})


@pytest.mark.parametrize("fmt", ["cloudevents", "cloudevents-binary"])
async def test_stream_cloudevents_are_read_by_the_sdk(
    redis_server_session: RedisServer, raw: aioredis.Redis, fmt: str
) -> None:
    stream, topic = unique("S"), unique("orders")
    url = durable_url(redis_server_session, stream, fmt)
    async with (
        await alkpubsub.connect(url) as t,
        t.subscribe(topic, consumer=unique("c"), start="earliest") as sub,
    ):
        sent = await t.publish(topic, {"n": 1}, headers={"traceparent": TRACEPARENT})
        [back] = await collect_acking(sub, 1)
    [(_, fields)] = await raw.xrange(stream)
    assert fields[b"topic"] == topic.encode()
    data = fields.pop(b"data")
    if fmt == "cloudevents":
        sdk = from_http(STRUCTURED, data)
    else:
        # Streams fields ce_<attribute>, as the SDK's HTTP binding names them ce-<attribute>.
        headers = {
            k.decode().replace("ce_", "ce-", 1): v.decode()
            for k, v in fields.items()
            if k != b"topic"
        }
        assert headers["content-type"] == "application/json"
        sdk = from_http(headers, data)
    assert_same(sdk, sent)
    assert (back.id, back.topic, back.payload) == (sent.id, topic, {"n": 1})
    assert back.headers["traceparent"] == TRACEPARENT


# -- (b) the SDK writes, alkpubsub reads ---------------------------------------------


async def test_an_sdk_cloudevent_published_raw_on_a_channel_is_received(
    redis_server_session: RedisServer, raw: aioredis.Redis
) -> None:
    prefix = f"{unique('p')}:"
    topic = unique("orders")
    sdk = sdk_event(topic)
    _, body = to_structured(sdk)
    async with (
        await alkpubsub.connect(f"{redis_server_session.url}?prefix={prefix}") as t,
        t.subscribe(f"{topic}:>") as wild,
        t.subscribe(topic) as sub,
    ):
        await raw.publish(f"{prefix}{topic}:x", body)  # a wildcard sees it as well
        [under] = await collect(wild, 1)
        await raw.publish(prefix + topic, body)
        [got] = await collect(sub, 1)
    assert_received(got, sdk, topic)
    assert_received(under, sdk, f"{topic}:x")
    assert "x-alk-foreign" not in got.headers  # a CloudEvent, not adopted text


@pytest.mark.parametrize("mode", ["structured-data", "structured-event", "binary"])
async def test_an_sdk_cloudevent_added_raw_to_the_stream_is_received(
    redis_server_session: RedisServer, raw: aioredis.Redis, mode: str
) -> None:
    stream, topic = unique("S"), unique("orders")
    sdk = sdk_event(topic)
    fields: dict[str, str | bytes]
    if mode == "binary":
        headers, body = to_binary(sdk)
        fields = {"topic": topic, "data": body}
        fields |= {k.replace("ce-", "ce_", 1): v for k, v in headers.items()}
    else:
        _, body = to_structured(sdk)
        fields = {"topic": topic, "data" if mode == "structured-data" else "event": body}
    async with (
        await alkpubsub.connect(durable_url(redis_server_session, stream)) as t,
        t.subscribe(topic, consumer=unique("c"), start="earliest") as sub,
    ):
        entry_id = await raw.xadd(stream, fields)  # type: ignore[arg-type]
        [got] = await collect_acking(sub, 1)
    assert_received(got, sdk, topic)
    assert got.offset == id_to_offset(entry_id)
    assert sub.stats.malformed == 0
