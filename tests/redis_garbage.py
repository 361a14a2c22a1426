"""Garbage that a raw redis-py client writes where alkpubsub subscriptions read.

Shared by tests/test_redis.py, tests/test_redis_durable.py and the
``garbage_writer`` fixtures of tests/test_conformance_redis.py. Every item is
something no alkpubsub publisher writes. The bad ones must be counted in
``stats.malformed`` by a subscription to the topic, the foreign ones adopted
as events (docs/decisions/004), and neither may stop delivery.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from alkpubsub import Event


def envelope(topic: str, **override: Any) -> dict[str, Any]:
    """A well-formed envelope for ``topic`` as a dict, with fields replaced."""
    event, body = Event.create(topic, {"n": 1}, origin="garbage")
    fields: dict[str, Any] = json.loads(event.envelope(body))
    fields.update(override)
    return fields


def bad_envelopes(topic: str) -> list[bytes]:
    """Message bodies that are malformed on ``topic``'s channel: not UTF-8, or
    claiming to be an envelope (the ``alkpubsub`` key) and not a valid one for it."""
    good = json.dumps(envelope(topic))
    return [
        b"\xff\xfe\x80 not utf-8 \xc3\x28",
        json.dumps(envelope("other:topic")).encode(),  # the topic disagrees
        json.dumps(envelope(topic, id=5, headers=[1])).encode(),  # wrong field types
        json.dumps(envelope(topic, alkpubsub=2)).encode(),  # another wire version
        good.replace('{"n": 1}', "9" * 100_000).encode(),  # a number far out of range
        good.replace('{"n": 1}', "[" * 100_000 + "]" * 100_000).encode(),  # nested too deep
    ]


def foreign_bodies() -> list[bytes]:
    """Message bodies another program might publish: JSON or text, adopted as events."""
    return [
        b"{not json",
        b"",
        b"null",
        b"[1, 2, 3]",
        b'{"hello": "world"}',  # JSON, not an envelope
        b"{" * 50_000,  # unterminated nesting: text
    ]


async def publish_garbage(url: str, channel: str, topic: str) -> int:
    """PUBLISH each bad body and each foreign body on ``channel`` (where
    ``topic`` is read); how many of them are malformed (the bad ones)."""
    client = aioredis.Redis.from_url(url)
    try:
        bodies = bad_envelopes(topic)
        for body in [*bodies, *foreign_bodies()]:
            await client.publish(channel, body)
        return len(bodies)
    finally:
        await client.aclose()


def bad_entries(topic: str) -> list[dict[Any, Any]]:
    """Stream entries that are malformed for a subscription to ``topic``: each
    names ``topic`` (or no valid topic at all) and is not a valid entry."""
    good = json.dumps(envelope(topic))
    entries: list[dict[Any, Any]] = [
        {"topic": topic},  # no event field, nor anything else
        {"topic": b"\xff\xfe", "event": good},  # a topic that is not UTF-8
        {"topic": "has space", "event": good},  # not a valid topic
        {"topic": topic, "event": "{}", "extra": "x", b"\xff\xfe": b"\x80"},  # extra, binary
        {"topic": topic, "event": json.dumps(envelope("other:topic"))},  # topics disagree
        {"topic": topic, "event": json.dumps(envelope(topic, id=5, published_at=[]))},
        {"topic": topic, "event": b"\xff\xfe\x80 not utf-8"},
        {"topic": topic, "event": "{not json"},
        {"topic": topic, "event": good.replace('{"n": 1}', "9" * 100_000)},
        {"topic": topic, "event": "[" * 100_000},
        {"topic": topic, "event": "x" * 1_500_000},  # larger than any publish may be
        {"topic": topic, "order": b"\xff\xfe"},  # foreign, but not text
    ]
    return entries


def foreign_entries(topic: str) -> list[dict[Any, Any]]:
    """Entries another program might add for ``topic``: adopted as events."""
    return [
        {"topic": topic, "order": "7", "qty": "2"},  # fields: the payload object
        {"topic": topic, "data": '{"n": 1}'},  # one data field: its JSON
        {"topic": topic, "payload": "plain text"},  # one payload field: its text
    ]


async def add_garbage(url: str, stream: str, topic: str) -> int:
    """XADD each bad entry and each foreign entry to ``stream``; how many are
    malformed (the bad ones)."""
    client = aioredis.Redis.from_url(url)
    try:
        entries = bad_entries(topic)
        for fields in [*entries, *foreign_entries(topic)]:
            await client.xadd(stream, fields)
        return len(entries)
    finally:
        await client.aclose()
