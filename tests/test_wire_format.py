"""Every transport writes envelopes that docs/wire-format.schema.json accepts,
read back with the broker's own raw client (or honker's own API)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import nats
import pytest
import redis.asyncio as aioredis
from brokers import NatsServer, RedisServer

import alkpubsub
from alkpubsub import Event, PayloadError
from alkpubsub.conformance import unique
from alkpubsub.storage import open_store

SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "docs" / "wire-format.schema.json").read_text()
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def samples(topic: str) -> list[dict[str, Any]]:
    """Publish arguments covering every field: with and without headers and key."""
    return [
        {"payload": {"order": 7, "items": ["a", "b"]}},
        {"payload": None, "headers": {"traceparent": "00-ab-cd-01", "x-n": "1"}},
        {"payload": [1, 2.5, "é✓"], "key": "customer-9"},
    ]


def check(raw: bytes | str, sent: Event) -> None:
    obj = json.loads(raw)
    errors = sorted(VALIDATOR.iter_errors(obj), key=str)
    assert not errors, f"{errors[0].message} at {list(errors[0].path)}"
    assert obj["alkpubsub"] == 1
    assert obj["id"] == sent.id and obj["topic"] == sent.topic
    assert obj["payload"] == sent.payload
    assert Event.from_json(raw, offset=sent.offset) == sent


def test_the_schema_itself_is_valid() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_schema_refuses_what_readers_refuse() -> None:
    event, body = Event.create("a:b", 1, origin="o")
    good = json.loads(event.envelope(body))
    for broken in (
        {**good, "alkpubsub": 2},
        {k: v for k, v in good.items() if k != "id"},
        {**good, "topic": "a::b"},
        {**good, "headers": {"a b": "x"}},
        {**good, "headers": {"n": 1}},
        {**good, "published_at": "yesterday"},
    ):
        assert list(VALIDATOR.iter_errors(broken)), broken
    with pytest.raises(PayloadError):
        Event.from_json(json.dumps({**good, "alkpubsub": 2}))


async def test_memory_and_codec_envelopes_match_the_schema() -> None:
    for kwargs in samples("m:x"):
        event, body = Event.create("m:x", origin="o", **kwargs)
        check(event.envelope(body), event)


async def test_honker_notification_and_stream_rows_match_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "wire.db"
    live = await alkpubsub.connect(f"honker://{path}")
    durable = await alkpubsub.connect(f"honker+durable://{path}?stream=events")
    topic = unique("h")
    try:
        sent_live = [await live.publish(topic, **kw) for kw in samples(topic)]
        sent_durable = [await durable.publish(topic, **kw) for kw in samples(topic)]
        store = open_store(path)
        try:
            # honker's own Database API, not ours, reads the rows.
            notes = store.honker.query(
                "SELECT payload FROM _honker_notifications WHERE channel = ? ORDER BY id",
                [topic],
            )
            rows = store.honker.query(
                "SELECT payload FROM _honker_stream WHERE topic = 'events' ORDER BY offset"
            )
        finally:
            store.close()
        assert len(notes) == len(sent_live) and len(rows) == len(sent_durable)
        for row, sent in zip(notes, sent_live, strict=True):
            check(row["payload"], sent)
        for row, sent in zip(rows, sent_durable, strict=True):
            check(row["payload"], sent)
    finally:
        await live.close()
        await durable.close()


async def test_redis_channel_messages_and_stream_fields_match_the_schema(
    redis_server_session: RedisServer,
) -> None:
    prefix = unique("w") + ":"
    stream = unique("S")
    raw = aioredis.from_url(redis_server_session.url)
    pubsub = raw.pubsub()
    await pubsub.psubscribe(prefix + "*")
    await pubsub.get_message(timeout=2)  # the psubscribe confirmation
    live = await alkpubsub.connect(f"{redis_server_session.url}?prefix={prefix}")
    durable = await alkpubsub.connect(
        redis_server_session.url.replace("redis://", "redis+durable://") + f"?stream={stream}"
    )
    topic = unique("r")
    try:
        sent = [await live.publish(topic, **kw) for kw in samples(topic)]
        for event in sent:
            async with asyncio.timeout(5):
                message = None
                while message is None:
                    message = await pubsub.get_message(timeout=1)
            assert message["channel"] == (prefix + topic).encode()
            check(message["data"], event)
        stored = [await durable.publish(topic, **kw) for kw in samples(topic)]
        entries = await raw.xrange(stream)
        assert len(entries) == len(stored)
        for (_, fields), event in zip(entries, stored, strict=True):
            assert fields[b"topic"] == topic.encode()
            check(fields[b"event"], event)
    finally:
        await live.close()
        await durable.close()
        await pubsub.aclose()
        await raw.aclose()


async def test_nats_messages_and_jetstream_messages_match_the_schema(
    nats_server_session: NatsServer,
) -> None:
    raw = await nats.connect(nats_server_session.url)
    got: asyncio.Queue[Any] = asyncio.Queue()

    async def on_message(msg: Any) -> None:
        await got.put(msg)

    stream = unique("W").upper()
    await raw.subscribe("alk.>", cb=on_message)
    await raw.subscribe(f"{stream}.>", cb=on_message)
    await raw.flush()
    live = await alkpubsub.connect(nats_server_session.url)
    durable = await alkpubsub.connect(
        nats_server_session.url.replace("nats://", "nats+durable://") + f"?stream={stream}"
    )
    topic = f"{unique('n')}:v1.2"
    try:
        for transport, subject_head in ((live, "alk."), (durable, f"{stream}.")):
            for kwargs in samples(topic):
                event = await transport.publish(topic, **kwargs)
                async with asyncio.timeout(5):
                    msg = await got.get()
                assert msg.subject == subject_head + topic.replace(".", "~").replace(":", ".")
                check(msg.data, event)
                if transport is durable:
                    assert msg.headers["Nats-Msg-Id"] == event.id
    finally:
        await live.close()
        await durable.close()
        await raw.close()
