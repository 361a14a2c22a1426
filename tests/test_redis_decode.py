"""The reading rule of both Redis transports (``_redis_decode.py``, decision 004),
without a broker: what a message body or a stream entry becomes."""

from __future__ import annotations

import json

import pytest

from alkpubsub import Event, PayloadError
from alkpubsub.transports._redis_decode import (
    FOREIGN_HEADER,
    ReadEntry,
    channel_seed,
    decode_body,
    entry_topic,
    read_entry,
)

TOPIC = "graph:created"


def body(data: bytes) -> Event:
    return decode_body(data, topic=TOPIC, seed=channel_seed(b"graph:created", data)).event


def ours(topic: str = TOPIC, **override: object) -> bytes:
    event, payload = Event.create(topic, {"n": 1}, origin="test")
    fields = json.loads(event.envelope(payload))
    fields.update(override)
    return json.dumps(fields).encode()


def entry(fields: dict[bytes, bytes], stream_topic: str | None = "events") -> ReadEntry:
    topic = entry_topic(fields, stream_topic)
    return read_entry(fields, topic=topic, entry_id=b"1700000000123-4", offset=1, stream="events")


def test_our_envelopes_with_or_without_the_version_key_are_ours() -> None:
    assert not decode_body(ours(), topic=TOPIC, seed="").foreign
    versionless = json.loads(ours())
    del versionless["alkpubsub"]
    assert not decode_body(json.dumps(versionless).encode(), topic=TOPIC, seed="").foreign


@pytest.mark.parametrize(
    "data",
    [
        ours("secret:payroll"),  # topic spoofing
        ours(id=5),  # claims to be ours, is not valid
        ours(alkpubsub=2),
        b'{"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "topic": "secret:x"}',
        b'{"specversion": "0.3", "id": "1", "source": "/s", "type": "t"}',
        b"\xff\xfe not utf-8",
        b'"' + b"x" * 2_100_000 + b'"',  # beyond any event
    ],
)
def test_malformed_bodies_raise_payload_error(data: bytes) -> None:
    with pytest.raises(PayloadError):
        body(data)


@pytest.mark.parametrize(
    ("data", "payload", "kind"),
    [
        (b'{"order": 7}', {"order": 7}, "json"),
        (b"[1, 2]", [1, 2], "json"),
        (b"null", None, "json"),
        (b"", "", "text"),
        (b"plain text", "plain text", "text"),
        (b"{not json", "{not json", "text"),
        (b"1" * 30, "1" * 30, "text"),  # JSON beyond the publish limits: its text
        (b"[" * 200 + b"]" * 200, "[" * 200 + "]" * 200, "text"),  # nested too deep
    ],
)
def test_foreign_bodies_are_adopted(data: bytes, payload: object, kind: str) -> None:
    event = body(data)
    assert (event.topic, event.payload, event.origin) == (TOPIC, payload, "foreign")
    assert event.headers == {FOREIGN_HEADER: kind}
    assert event.id == body(data).id  # channel + body: deterministic


def test_only_envelopes_and_cloudevents_are_accepted_without_adopt() -> None:
    with pytest.raises(PayloadError):
        decode_body(b'{"order": 7}', topic=TOPIC, seed="", adopt=False)


def test_an_entry_topic_is_its_topic_field_else_the_stream_key() -> None:
    assert entry_topic({b"topic": b"a:b"}, "events") == "a:b"
    assert entry_topic({b"order": b"7"}, "events") == "events"
    assert entry_topic({b"topic": b"has space"}, "events") is None
    assert entry_topic({b"topic": b"\xff"}, "events") is None
    assert entry_topic({b"order": b"7"}, None) is None


def test_foreign_entries_by_their_fields() -> None:
    fields = entry({b"topic": b"a:b", b"order": b"7", b"qty": b"2"})
    assert fields.decoded is not None and fields.decoded.foreign
    assert fields.decoded.event.payload == {"order": "7", "qty": "2"}
    assert fields.decoded.event.published_at.timestamp() == 1700000000.123
    lone = entry({b"topic": b"a:b", b"data": b'{"n": 1}'})
    assert lone.decoded is not None and lone.decoded.event.payload == {"n": 1}
    text = entry({b"payload": b"hello"})
    assert text.decoded is not None
    assert (text.decoded.event.topic, text.decoded.event.payload) == ("events", "hello")
    again = entry({b"payload": b"other body, same entry id"})
    assert again.decoded is not None and again.decoded.event.id == text.decoded.event.id


@pytest.mark.parametrize(
    "fields",
    [
        {b"topic": b"a:b"},  # a topic and nothing else
        {b"topic": b"a:b", b"order": b"\xff"},  # not text
        {b"topic": b"a:b", b"event": b'{"order": 7}'},  # our field, not an envelope
        {b"topic": b"has space", b"event": ours()},
    ],
)
def test_malformed_entries(fields: dict[bytes, bytes]) -> None:
    read = entry(fields)
    assert read.decoded is None and read.error


def test_binary_cloudevent_fields_with_ce_datacontenttype() -> None:
    read = entry(
        {
            b"topic": b"a:b",
            b"ce_specversion": b"1.0",
            b"ce_id": b"42",
            b"ce_source": b"/s",
            b"ce_type": b"t",
            b"ce_datacontenttype": b"text/plain",
            b"data": b"hello",
        }
    )
    assert read.decoded is not None and not read.decoded.foreign
    assert (read.decoded.event.id, read.decoded.event.payload) == ("42", "hello")
