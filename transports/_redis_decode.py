"""How a message read from Redis becomes an event, on both Redis transports.

A pub/sub message body, or a stream entry's fields, is one of:

* **ours**: an envelope (``{"alkpubsub": 1, ...}``, or a version-less one that
  validates as an envelope); its topic must be the topic it arrived on;
* **a CloudEvent**: structured (a JSON object with ``specversion``), or on
  Streams binary (``ce_*`` fields, the body in ``data``), decoded by
  :mod:`alkpubsub.cloudevents` with the arrival topic;
* **foreign**: anything else that is JSON or UTF-8 text, *adopted* by this
  rule: topic = the arrival topic; id = ``uuid5`` over where it was read
  (stream + entry id, or channel + body), so a redelivery keeps it; payload =
  the JSON value if it passes the publish limits, else the text; header
  ``x-alk-foreign: json`` or ``text``; ``published_at`` = the entry id's time
  on Streams, now on pub/sub; origin ``foreign``.

Everything else raises :class:`PayloadError` (*malformed*): bytes that are not
UTF-8, a message that claims to be ours (or a CloudEvent) and is not valid,
one whose envelope names another topic (a spoof), one too large to publish.

Stream entries (docs/decisions/004): the arrival topic is the ``topic`` field,
else the stream key (Dapr's layout: one stream per topic). An ``event`` field
must hold an envelope or a structured CloudEvent. Without it, ``ce_*`` fields
make a binary CloudEvent; a lone ``data`` or ``payload`` field is decoded as a
message body (above); any other fields become the payload as one JSON object
of text values (``x-alk-foreign: json``).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic_core import from_json

from alkpubsub.cloudevents import from_binary, from_structured
from alkpubsub.errors import InvalidTopic, PayloadError
from alkpubsub.event import Event, encode_payload
from alkpubsub.limits import MAX_PAYLOAD_BYTES, check_payload
from alkpubsub.topics import validate_topic

FOREIGN_HEADER = "x-alk-foreign"
FOREIGN_ORIGIN = "foreign"
FOREIGN_VALUES = ("adopt", "dead_letter", "drop")
"""Values of the ``foreign`` option: deliver, dead-letter or drop (counted) foreign messages."""
_NAMESPACE = uuid.UUID("3b0c6f0e-7d1e-4a8b-9f43-1c2d5e6a7b80")
_OURS = b'{"alkpubsub":'  # how every envelope this library writes begins
_ENVELOPE_KEYS = frozenset({"id", "topic", "published_at"})


@dataclass(frozen=True, slots=True)
class Decoded:
    """An event read from Redis; ``foreign`` when adopted by the foreign rule."""

    event: Event
    foreign: bool = False


def _ours(data: bytes, topic: str, offset: int | None) -> Event:
    event = Event.from_json(data, offset=offset)
    if event.topic != topic:
        raise PayloadError(f"its envelope names topic {event.topic!r}, not {topic!r}")
    return event


def _cloudevent(event: Event, topic: str) -> Event:
    check_payload(event.payload, topic=topic)
    return event


def decode_body(
    data: bytes,
    *,
    topic: str,
    seed: str | Callable[[], str],
    offset: int | None = None,
    published_at: datetime | None = None,
    adopt: bool = True,
) -> Decoded:
    """Decode one message body that arrived on ``topic``, or raise
    :class:`PayloadError`. ``seed`` names where it was read (the foreign id's
    source; a callable is called only for a foreign message). With
    ``adopt=False`` only an envelope or a CloudEvent is accepted."""
    if data.startswith(_OURS):
        return Decoded(_ours(data, topic, offset))
    if len(data) > MAX_PAYLOAD_BYTES * 2:
        raise PayloadError(f"{len(data)} bytes: larger than any event may be")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise PayloadError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        value: Any = from_json(data)
        parsed = True
    except ValueError:
        value, parsed = None, False
    if parsed and isinstance(value, dict):
        if "alkpubsub" in value:
            return Decoded(_ours(data, topic, offset))
        if "specversion" in value:
            return Decoded(_cloudevent(from_structured(data, offset=offset, topic=topic), topic))
        if value.keys() >= _ENVELOPE_KEYS:
            try:
                event = Event.from_json(data, offset=offset)
            except PayloadError:
                pass  # JSON that only looks like an envelope: foreign
            else:
                if event.topic != topic:
                    raise PayloadError(f"its envelope names topic {event.topic!r}, not {topic!r}")
                return Decoded(event)
    if not adopt:
        raise PayloadError("neither an envelope nor a CloudEvent")
    if parsed:
        try:
            check_payload(value, topic=topic)
        except PayloadError:
            parsed = False  # beyond the limits: delivered as its text
    return Decoded(
        adopted(
            value if parsed else text,
            "json" if parsed else "text",
            topic=topic,
            seed=seed if isinstance(seed, str) else seed(),
            offset=offset,
            published_at=published_at,
        ),
        foreign=True,
    )


def adopted(
    payload: Any,
    kind: str,
    *,
    topic: str,
    seed: str,
    offset: int | None,
    published_at: datetime | None,
) -> Event:
    """The event a foreign message becomes (see the module docstring)."""
    # Held to the publish size too: whatever is delivered can be published again.
    encode_payload(payload, topic=topic, max_bytes=MAX_PAYLOAD_BYTES)
    return Event(
        id=str(uuid.uuid5(_NAMESPACE, seed)),
        topic=topic,
        payload=payload,
        headers={FOREIGN_HEADER: kind},
        published_at=published_at or datetime.now(UTC),
        origin=FOREIGN_ORIGIN,
        offset=offset,
    )


def channel_seed(channel: bytes, data: bytes) -> Callable[[], str]:
    """A pub/sub message's foreign-id source: its channel and a hash of its body
    (computed only if the message turns out to be foreign)."""
    return lambda: (
        f"redis-channel/{channel.decode(errors='replace')}/{hashlib.sha256(data).hexdigest()}"
    )


# -- stream entries --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadEntry:
    """One stream entry as read: its arrival topic (None when it names none
    that is valid), the event, or why it is malformed (and its raw text)."""

    topic: str | None
    decoded: Decoded | None = None
    error: str | None = None
    raw: bytes = b""


def _entry_time(entry_id: bytes) -> datetime:
    ms = int(entry_id.partition(b"-")[0])
    return datetime.fromtimestamp(ms / 1000, UTC)


def _text(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise PayloadError(f"field {value[:40]!r} is not UTF-8 text") from None


def entry_topic(fields: dict[bytes, bytes], stream_topic: str | None) -> str | None:
    """A stream entry's arrival topic: its ``topic`` field, else the stream key
    as a topic (``stream_topic``); None when it names no valid topic. Read
    before anything is parsed, so a group skips other topics' entries cheaply."""
    raw_topic = fields.get(b"topic")
    if raw_topic is None:
        return stream_topic
    try:
        return validate_topic(raw_topic.decode())
    except (UnicodeDecodeError, InvalidTopic):
        return None


def read_entry(
    fields: dict[bytes, bytes],
    *,
    topic: str | None,
    entry_id: bytes,
    offset: int,
    stream: str,
) -> ReadEntry:
    """Decode a stream entry that arrived on ``topic`` (:func:`entry_topic`;
    see the module docstring)."""
    data = fields.get(b"event")
    if topic is None:
        raw_topic = fields.get(b"topic")
        what = "no topic field" if raw_topic is None else f"topic field {raw_topic[:60]!r}"
        return ReadEntry(None, error=f"{what} is not a topic", raw=data or b"")
    try:
        if data is not None:
            decoded = decode_body(data, topic=topic, seed="", offset=offset, adopt=False)
            return ReadEntry(topic, decoded)
        return ReadEntry(topic, _foreign_entry(fields, topic, entry_id, offset, stream))
    except PayloadError as exc:
        return ReadEntry(topic, error=str(exc), raw=data if data is not None else _dump(fields))


def _dump(fields: dict[bytes, bytes]) -> bytes:
    return b" ".join(k + b"=" + v for k, v in fields.items())


def _foreign_entry(
    fields: dict[bytes, bytes], topic: str, entry_id: bytes, offset: int, stream: str
) -> Decoded:
    seed = f"redis-stream/{stream}/{entry_id.decode()}"
    when = _entry_time(entry_id)
    named = {_text(k): v for k, v in fields.items() if k != b"topic"}
    if not named:
        raise PayloadError("a topic field and nothing else")
    if any(name[:3].lower() in ("ce_", "ce-") for name in named):
        headers = {name: _text(value) for name, value in named.items() if name != "data"}
        ctype = next((v for k, v in headers.items() if k.lower() == "ce_datacontenttype"), None)
        if ctype is not None and not any(k.lower() == "content-type" for k in headers):
            headers["content-type"] = ctype
        event = from_binary(headers, named.get("data", b""), offset=offset, topic=topic)
        return Decoded(_cloudevent(event, topic))
    if len(named) == 1 and ("data" in named or "payload" in named):
        [body] = named.values()
        return decode_body(body, topic=topic, seed=seed, offset=offset, published_at=when)
    payload = {name: _text(value) for name, value in named.items()}
    return Decoded(
        adopted(payload, "json", topic=topic, seed=seed, offset=offset, published_at=when),
        foreign=True,
    )
