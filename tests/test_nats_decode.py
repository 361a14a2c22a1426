"""The NATS reading rule without a broker (transports/_nats_decode.py): ours
with or without the version key, spoofs and broken envelopes malformed,
CloudEvents in both modes, foreign bodies adopted with deterministic ids, and
every ``format=`` read back whatever it wrote."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent

from alkpubsub import Event, PayloadError
from alkpubsub.transports._nats_decode import adopt, decode, encode, headers_size

TOPIC = "graph:created"


def ours(topic: str = TOPIC) -> tuple[Event, bytes]:
    event, body = Event.create(topic, {"n": 1}, origin="test", headers={"h": "v"})
    return event, event.envelope(body)


def test_our_envelope_is_read_as_is() -> None:
    event, data = ours()
    got = decode(data, None, TOPIC, offset=3)
    assert got is not None and got.id == event.id and got.offset == 3


def test_an_envelope_without_the_version_key_is_ours_too() -> None:
    event, data = ours()
    fields = json.loads(data)
    del fields["alkpubsub"]
    got = decode(json.dumps(fields).encode(), None, TOPIC)
    assert got is not None and got.id == event.id


@pytest.mark.parametrize(
    "data",
    [
        ours("secret:payroll")[1],  # the topic is not the subject's
        ours()[1][:-10],  # broken JSON that claims to be ours
        ours()[1].replace(b'"alkpubsub":1', b'"alkpubsub":2'),  # another version
        json.dumps({**json.loads(ours()[1]), "id": 5}).encode(),  # ours, wrong types
        b"\xff\xfe not utf-8",
        b'{"specversion": "1.0", "id": "x"}',  # a CloudEvent without source and type
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(PayloadError):
        decode(data, None, TOPIC)


def test_a_binary_cloudevent_naming_another_topic_is_a_spoof() -> None:
    ce = CloudEvent({"type": TOPIC, "source": "/s", "id": "1", "topic": "secret:payroll"}, {})
    headers, body = to_binary(ce)
    with pytest.raises(PayloadError, match="secret:payroll"):
        decode(body, headers, TOPIC)


@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_sdk_cloudevents_are_read(mode: str) -> None:
    ce = CloudEvent({"type": "com.example", "source": "/s", "id": "ce-1"}, {"a": [1]})
    headers, body = to_structured(ce) if mode == "structured" else to_binary(ce)
    got = decode(body, headers, TOPIC, offset=9)
    assert got is not None
    assert (got.id, got.topic, got.payload, got.offset) == ("ce-1", TOPIC, {"a": [1]}, 9)
    assert got.headers["ce-type"] == "com.example"


@pytest.mark.parametrize(
    ("data", "payload", "kind"),
    [
        (b'{"hello": "world"}', {"hello": "world"}, "json"),
        (b"null", None, "json"),
        (b"[1, 2]", [1, 2], "json"),
        (b"plain text", "plain text", "text"),
        (b"", "", "text"),
        (b"{not json", "{not json", "text"),
        (b'{"n": 1e999}', '{"n": 1e999}', "text"),  # JSON beyond the publish limits
        (b"[" * 200 + b"]" * 200, "[" * 200 + "]" * 200, "text"),  # too deep
    ],
)
def test_foreign_messages_are_adopted(data: bytes, payload: object, kind: str) -> None:
    assert decode(data, None, TOPIC) is None
    when = datetime(2026, 1, 2, tzinfo=UTC)
    got = adopt(data, TOPIC, seed="S/7", offset=7, published_at=when)
    assert got.topic == TOPIC and got.payload == payload
    assert got.headers == {"x-alk-foreign": kind}
    assert got.origin == "foreign" and got.offset == 7 and got.published_at == when
    assert got.id == adopt(data, TOPIC, seed="S/7").id != adopt(data, TOPIC, seed="S/8").id


def test_a_foreign_message_over_the_payload_limit_is_malformed() -> None:
    data = b"x" * 1_000_001
    assert decode(data, None, TOPIC) is None
    with pytest.raises(PayloadError, match="payload limit"):
        adopt(data, TOPIC, seed="s")


@pytest.mark.parametrize("fmt", ["alkpubsub", "cloudevents", "cloudevents-binary"])
def test_every_format_reads_back_as_the_same_event(fmt: str) -> None:
    event, body = Event.create(TOPIC, {"n": 1}, origin="o", headers={"traceparent": "t"})
    data, headers = encode(event, body, fmt)  # type: ignore[arg-type]
    assert (headers is not None) == (fmt == "cloudevents-binary")
    got = decode(data, headers, TOPIC)
    assert got is not None
    assert (got.id, got.topic, got.payload, got.origin) == (event.id, TOPIC, {"n": 1}, "o")
    assert got.headers["traceparent"] == "t"
    assert got.published_at == event.published_at


def test_headers_size_counts_the_nats_header_block() -> None:
    headers = {"ce-id": "abc", "content-type": "application/json"}
    block = b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
    assert headers_size(headers) == len(block + b"\r\n")
    assert headers_size(None) == 0
