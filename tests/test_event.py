"""The event envelope and its ids (``alkpubsub.event``)."""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest

import alkpubsub
from alkpubsub import Event, PayloadError
from alkpubsub.event import encode_payload, uuid7

ID_COUNT = 100_000


def _ms_of(uuid_text: str) -> int:
    """The Unix milliseconds a UUIDv7 carries in its top 48 bits."""
    return uuid.UUID(uuid_text).int >> 80


def test_uuid7_ids_are_valid_version_7_rfc4122_uuids() -> None:
    for _ in range(1000):
        text = uuid7()
        parsed = uuid.UUID(text)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text  # canonical lower-case 8-4-4-4-12 text


def test_uuid7_carries_the_current_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    stamp = _ms_of(uuid7())
    after = time.time_ns() // 1_000_000
    # The counter may nudge the timestamp ahead when more than ~3000 ids are
    # made in one millisecond (RFC 9562 6.2); 1 s of slack covers any earlier test.
    assert before <= stamp <= after + 1000


def test_uuid7_strictly_increasing_and_unique_over_100k_ids() -> None:
    ids = [uuid7() for _ in range(ID_COUNT)]
    # Text order is time order: brokers and logs can sort ids as strings.
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert len(set(ids)) == ID_COUNT


def test_uuid7_ids_from_forked_child_differ_from_parents() -> None:
    # Parent and child share the counter state at fork; only the random bits,
    # reseeded in the child, keep them apart.
    uuid7()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: write 1000 ids and leave without running pytest teardown
        try:
            os.close(read_end)
            with os.fdopen(write_end, "w") as out:
                out.write("\n".join(uuid7() for _ in range(1000)))
        finally:
            os._exit(0)
    os.close(write_end)
    parent_ids = {uuid7() for _ in range(1000)}
    with os.fdopen(read_end) as inp:
        child_ids = set(inp.read().split("\n"))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(child_ids) == 1000
    assert all(uuid.UUID(x).version == 7 for x in child_ids)
    assert parent_ids.isdisjoint(child_ids)


def test_envelope_round_trip_keeps_every_field() -> None:
    payload = {"nodes": [1, 2.5, "x", None, True], "nested": {"ü": "ñ"}}
    event, body = Event.create(
        "graph:created", payload, origin="proc-1", headers={"trace": "t-1"}, key="k-1"
    )
    wire = event.envelope(body)
    back = Event.from_json(wire)
    assert back.model_dump() == event.model_dump()
    assert back == event
    assert back.published_at.tzinfo is not None
    assert back.published_at.utcoffset() == UTC.utcoffset(None)
    # Re-serialising without the body gives the same bytes.
    assert event.envelope() == wire
    assert Event.from_json(wire.decode()) == event  # str input too


def test_envelope_round_trip_with_defaults_and_scalar_payload() -> None:
    payloads: list[Any] = [None, 0, "text", [], 3.25, False]
    for payload in payloads:
        event, body = Event.create("a:b", payload, origin="")
        back = Event.from_json(event.envelope(body))
        assert back == event
        assert back.payload == payload
        assert back.key is None
        assert back.headers == {}


def test_offset_is_not_on_the_wire_and_is_set_by_the_reader() -> None:
    event, body = Event.create("a:b", {"n": 1}, origin="o")
    stored = event.with_offset(41)
    on_wire = json.loads(stored.envelope(body))
    assert "offset" not in on_wire
    assert set(on_wire) == {
        "alkpubsub",
        "id",
        "topic",
        "headers",
        "published_at",
        "origin",
        "payload",
    }
    assert Event.from_json(stored.envelope(body)).offset is None
    read = Event.from_json(stored.envelope(body), offset=42)
    assert read.offset == 42
    assert read.model_dump(exclude={"offset"}) == event.model_dump(exclude={"offset"})


def test_key_is_on_the_wire_only_when_set() -> None:
    with_key, body = Event.create("a:b", 1, origin="o", key="user-7")
    assert json.loads(with_key.envelope(body))["key"] == "user-7"
    without, body = Event.create("a:b", 1, origin="o")
    assert "key" not in json.loads(without.envelope(body))


def test_unknown_envelope_fields_are_ignored_for_forward_compatibility() -> None:
    event, body = Event.create("a:b", {"n": 1}, origin="o")
    data = json.loads(event.envelope(body))
    data["added_in_v2"] = {"x": 1}
    assert Event.from_json(json.dumps(data)) == event


_GOOD = {
    "id": "0190b8a4-0000-7000-8000-000000000000",
    "topic": "a:b",
    "payload": {"n": 1},
    "headers": {},
    "published_at": "2024-07-01T12:00:00+00:00",
    "origin": "o",
}


@pytest.mark.parametrize(
    ("wire", "says"),
    [
        (b"not json", "Invalid JSON"),
        (b"", "Invalid JSON"),
        (b"\xff\xfe", "Invalid JSON"),
        (b'{"id": "x", ', "Invalid JSON"),
        (b"[1, 2]", "Input should be an object"),
        (b"null", "Input should be an object"),
        (json.dumps({k: v for k, v in _GOOD.items() if k != "id"}).encode(), "('id',)"),
        (json.dumps({k: v for k, v in _GOOD.items() if k != "topic"}).encode(), "('topic',)"),
        (json.dumps({**_GOOD, "id": 5}).encode(), "('id',)"),
        (json.dumps({**_GOOD, "topic": ["a"]}).encode(), "('topic',)"),
        (json.dumps({**_GOOD, "headers": {"h": 1}}).encode(), "('headers', 'h')"),
        (json.dumps({**_GOOD, "headers": "h=1"}).encode(), "('headers',)"),
        (json.dumps({**_GOOD, "published_at": "yesterday"}).encode(), "('published_at',)"),
        (json.dumps({**_GOOD, "offset": "first"}).encode(), "('offset',)"),
    ],
    ids=[
        "not-json",
        "empty",
        "not-utf8",
        "truncated",
        "array",
        "null",
        "missing-id",
        "missing-topic",
        "int-id",
        "list-topic",
        "int-header-value",
        "str-headers",
        "bad-date",
        "str-offset",
    ],
)
def test_malformed_envelope_raises_payload_error(wire: bytes, says: str) -> None:
    assert Event.from_json(json.dumps(_GOOD)).topic == "a:b"  # the baseline parses
    with pytest.raises(PayloadError) as caught:
        Event.from_json(wire)
    assert says in str(caught.value)
    assert "malformed event envelope" in str(caught.value)


async def test_payload_mutation_after_publish_does_not_change_event() -> None:
    transport = await alkpubsub.connect("memory://")
    try:
        async with transport.subscribe("a:*") as sub:
            payload: dict[str, Any] = {"items": [1], "meta": {"v": 1}}
            published = await transport.publish("a:b", payload)
            payload["items"].append(2)
            payload["meta"]["v"] = 2
            payload["extra"] = True
            received = await sub.get(timeout=1)
    finally:
        await transport.close()
    assert published.payload == {"items": [1], "meta": {"v": 1}}
    assert received.payload == {"items": [1], "meta": {"v": 1}}


def test_event_create_copies_headers() -> None:
    headers = {"trace": "t-1"}
    event, _ = Event.create("a:b", None, origin="o", headers=headers)
    headers["trace"] = "changed"
    assert event.headers == {"trace": "t-1"}


class _Opaque:
    pass


@pytest.mark.parametrize(
    "payload",
    [_Opaque(), {"x": object()}, [1, {2, 3}, lambda: 1], b"\xff"],
    ids=["object", "nested-object", "lambda", "non-utf8-bytes"],
)
async def test_non_serialisable_payload_raises_payload_error_naming_topic(
    payload: object,
) -> None:
    with pytest.raises(PayloadError, match=r"'graph:created' .*not a JSON value"):
        Event.create("graph:created", payload, origin="o")
    transport = await alkpubsub.connect("memory://")
    try:
        with pytest.raises(PayloadError, match=r"'graph:created' .*not a JSON value"):
            await transport.publish("graph:created", payload)
    finally:
        await transport.close()


def test_circular_payload_raises_payload_error() -> None:
    loop: dict[str, object] = {}
    loop["self"] = loop
    with pytest.raises(PayloadError, match=r"deeper than 100 levels \(or refers to itself\)"):
        encode_payload(loop, topic="a:b")


def test_event_is_frozen() -> None:
    event, _ = Event.create("a:b", {"n": 1}, origin="o")
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        event.topic = "a:c"
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        event.offset = 3
    # Copies are how an event changes.
    assert event.with_offset(3).offset == 3
    assert event.with_headers(x="1").headers == {"x": "1"}
    assert event.offset is None
    assert event.headers == {}


def test_published_at_is_timezone_aware_utc_now() -> None:
    before = datetime.now(UTC)
    event, _ = Event.create("a:b", None, origin="o")
    after = datetime.now(UTC)
    assert event.published_at.tzinfo is UTC
    assert before <= event.published_at <= after


@pytest.mark.parametrize(
    "payload",
    [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"1e999999",
        b"1180591620717411303424",
        b"[" * 150 + b"]" * 150,
    ],
    ids=["nan", "inf", "-inf", "overflowing-float", "70-bit-int", "150-deep"],
)
def test_envelopes_beyond_the_publish_limits_are_malformed_when_read(payload: bytes) -> None:
    # Another writer can put these on the wire; delivering them would hand the
    # application an event that it (or a relay) could not publish again.
    event, _ = Event.create("a:b", 1, origin="o")
    with pytest.raises(PayloadError):
        Event.from_json(event.envelope(payload))
