"""CloudEvents 1.0 both ways against the CNCF ``cloudevents`` SDK."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent, from_http

from alkpubsub import Event, PayloadError
from alkpubsub import cloudevents as ce

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def ours() -> Event:
    event, _ = Event.create(
        "orders:created",
        {"order": 7, "items": ["a", "b"], "total": 12.5},
        origin="4242-abc",
        headers={"traceparent": TRACEPARENT, "tenant": "acme", "X-Request-Id": "r-1"},
        key="customer-9",
    )
    return event


def check_sdk_view(sdk: CloudEvent, event: Event) -> None:
    assert sdk["id"] == event.id
    assert sdk["type"] == event.topic
    assert sdk["source"] == f"/alkpubsub/{event.origin}"
    assert sdk["specversion"] == "1.0"
    assert sdk.data == event.payload
    assert sdk["traceparent"] == TRACEPARENT
    assert sdk["partitionkey"] == "customer-9"
    assert sdk["topic"] == "orders:created"
    sdk_time = datetime.fromisoformat(str(sdk["time"]).replace("Z", "+00:00"))
    assert sdk_time == event.published_at


def test_structured_event_we_write_parses_in_the_sdk_with_the_same_fields() -> None:
    event = ours()
    sdk = from_http({"content-type": "application/cloudevents+json"}, ce.to_structured(event))
    check_sdk_view(sdk, event)
    assert sdk["tenant"] == "acme"


def test_binary_event_we_write_parses_in_the_sdk_with_the_same_fields() -> None:
    event = ours()
    headers, body = ce.to_binary(event)
    sdk = from_http(headers, body)
    check_sdk_view(sdk, event)


def sdk_event() -> CloudEvent:
    return CloudEvent(
        {
            "id": "evt-123",
            "source": "https://orders.example.com/api",
            "type": "com.example.order.created",
            "time": "2026-12-01T09:30:00.123456Z",
            "traceparent": TRACEPARENT,
            "tenant": "acme",
            "partitionkey": "p-1",
        },
        {"order": 9},
    )


@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_an_sdk_event_is_consumed_as_an_event(mode: str) -> None:
    sdk = sdk_event()
    if mode == "structured":
        _, body = to_structured(sdk)
        event = ce.from_structured(body, offset=3)
    else:
        headers, body = to_binary(sdk)
        event = ce.from_binary(headers, body, offset=3)
    assert event.id == "evt-123"
    assert event.topic == "com.example.order.created"
    assert event.payload == {"order": 9}
    assert event.origin == "https://orders.example.com/api"
    assert event.published_at == datetime(2026, 12, 1, 9, 30, 0, 123456, tzinfo=UTC)
    assert event.headers["traceparent"] == TRACEPARENT
    assert event.headers["tenant"] == "acme"
    assert event.key == "p-1"
    assert event.offset == 3


@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_our_own_events_round_trip_without_loss(mode: str) -> None:
    event = ours()
    if mode == "structured":
        back = ce.from_structured(ce.to_structured(event))
    else:
        back = ce.from_binary(*ce.to_binary(event))
    assert back == event


@pytest.mark.parametrize(
    "text",
    [
        b"not json",
        b"[1, 2]",
        b'{"id": "x", "source": "s", "type": "t"}',
        b'{"specversion": "0.3", "id": "x", "source": "s", "type": "t"}',
        b'{"specversion": "1.0", "source": "s", "type": "t"}',
        b'{"specversion": "1.0", "id": 5, "source": "s", "type": "t"}',
        b'{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "time": "yesterday"}',
    ],
)
def test_malformed_cloudevents_raise_payload_error(text: bytes) -> None:
    with pytest.raises(PayloadError):
        ce.from_structured(text)


def test_base64_data_is_kept_as_text_and_marked() -> None:
    event = ce.from_structured(
        b'{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "data_base64": "AAEC"}'
    )
    assert event.payload == "AAEC"
    assert event.headers["ce-data-encoding"] == "base64"


def test_the_arrival_topic_wins_and_a_spoofed_topic_is_refused() -> None:
    _, body = to_structured(sdk_event())
    event = ce.from_structured(body, topic="orders:created")
    assert event.topic == "orders:created"
    assert event.headers["ce-type"] == "com.example.order.created"
    ours_text = ce.to_structured(ours())
    with pytest.raises(PayloadError, match="arrived on 'secret:payroll'"):
        ce.from_structured(ours_text, topic="secret:payroll")
    headers, data = ce.to_binary(ours())
    assert ce.from_binary(headers, data, topic="orders:created").topic == "orders:created"
