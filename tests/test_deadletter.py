"""The one dead-letter builder: the same headers, payload and ids on every transport."""

from __future__ import annotations

from alkpubsub import Event
from alkpubsub.deadletter import MAX_RAW_CHARS, dead_letter, should_dead_letter


def test_a_failed_event_keeps_its_payload_headers_and_says_why() -> None:
    event, _ = Event.create("orders:created", {"n": 1}, origin="o", headers={"trace": "t"})
    event = event.with_offset(7)
    letter, body = dead_letter(
        topic=event.topic,
        reason="boom\r\nsecond line",
        origin="me",
        event=event,
        deliveries=5,
        consumer="billing",
    )
    assert letter.topic == "dead:orders:created"
    assert letter.payload == {"n": 1} and body == b'{"n":1}'
    assert letter.headers == {
        "trace": "t",
        "x-dead-reason": "boom second line",
        "x-dead-kind": "event",
        "x-deliveries": "5",
        "x-consumer": "billing",
        "x-original-id": event.id,
        "x-original-topic": "orders:created",
        "x-original-offset": "7",
    }
    again, _ = dead_letter(
        topic=event.topic, reason="x", origin="other", event=event, consumer="billing"
    )
    assert again.id == letter.id, "re-burying after a crash must give the same id"


def test_malformed_messages_keep_their_text_and_get_one_id_per_position() -> None:
    raw = b"\xff\xfe not an event " + b"x" * (MAX_RAW_CHARS + 10)
    first, _ = dead_letter(topic="", reason="bad", origin="o", raw=raw, offset=1)
    second, _ = dead_letter(topic="", reason="bad", origin="o", raw=raw, offset=2)
    assert first.topic == "dead:unknown"
    assert len(first.payload) == MAX_RAW_CHARS and first.headers["x-dead-truncated"] == "true"
    assert first.headers["x-dead-kind"] == "malformed"
    # Same text, two positions: two dead letters (JetStream dedupes by id).
    assert first.id != second.id
    replay, _ = dead_letter(topic="", reason="bad", origin="o", raw=raw, offset=1)
    assert replay.id == first.id


def test_a_dead_letter_is_never_dead_lettered_again() -> None:
    assert should_dead_letter("orders:created", 5, 5)
    assert not should_dead_letter("orders:created", 4, 5)
    assert not should_dead_letter("dead:orders:created", 50, 5)
