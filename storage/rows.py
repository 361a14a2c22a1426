"""Reading a row of a Honker file: our envelope, a CloudEvent, or a foreign message.

Any SQLite client writes these tables, and honker's own API (``stream.publish``,
``tx.notify``, the Node binding) writes JSON that is not our envelope. Every row
is parsed (``pydantic_core.from_json``, never a regex on the text) and read as:

ours
    a JSON object with the ``"alkpubsub"`` key, or one that validates as an
    envelope without it (written before wire format v1). It must be a valid
    envelope whose topic is the row's topic, else it is *malformed*.
a CloudEvent
    a JSON object with ``specversion``: decoded by :mod:`alkpubsub.cloudevents`
    (an invalid one, or one naming another topic than its channel, is malformed).
foreign
    any other JSON value or UTF-8 text. With ``foreign=adopt`` (the default) it
    becomes an Event by this rule: topic = the channel it arrived on (stream rows
    have no topic of their own: the ``foreign_topic`` option); id =
    ``uuid5(location + position)``, the same on every read of the row; payload =
    the parsed JSON if it passes the publish limits, else the text; header
    ``x-alk-foreign: json`` or ``text``; ``published_at`` = the row's
    ``created_at``; ``origin`` = ``foreign``; ``key`` = the row's key. With
    ``foreign=dead_letter`` or ``drop`` it is refused like a malformed row
    (dead-lettered by named consumers, or only counted).

A value that is not TEXT (a BLOB, a number), empty text (honker reads TEXT
that is not UTF-8 as empty), or text beyond the publish limits is malformed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError
from pydantic_core import from_json

from alkpubsub.cloudevents import from_structured
from alkpubsub.errors import ConfigError, InvalidTopic, PayloadError
from alkpubsub.event import Event
from alkpubsub.limits import MAX_PAYLOAD_BYTES, check_payload
from alkpubsub.topics import validate_topic

ForeignMode = Literal["adopt", "dead_letter", "drop"]
FOREIGN_MODES: tuple[str, ...] = ("adopt", "dead_letter", "drop")
FOREIGN_ORIGIN = "foreign"
FOREIGN_HEADER = "x-alk-foreign"
_NAMESPACE = uuid.UUID("0b6f0f9e-4b39-4a53-9d0e-3f1c6f3a8a11")
_ENVELOPE_KEYS = ("id", "topic", "published_at")


def check_foreign_mode(value: str) -> ForeignMode:
    """``foreign`` must be ``adopt``, ``dead_letter`` or ``drop``; raise :class:`ConfigError`."""
    if value not in FOREIGN_MODES:
        raise ConfigError(
            f"foreign={value!r} is not an option value; use foreign=adopt (the default), "
            "foreign=dead_letter or foreign=drop"
        )
    return value  # type: ignore[return-value]


def default_foreign_topic(stream: str) -> str:
    """The topic of foreign rows of ``stream``: its name if that is a topic, else ``foreign``."""
    try:
        return validate_topic(stream)
    except InvalidTopic:
        return "foreign"


@dataclass(frozen=True, slots=True)
class Malformed:
    """A row that is no event (or a foreign one refused by the ``foreign`` option)."""

    topic: str | None
    """The topic it is filed under: the one it claims or arrived on, if any."""
    detail: str
    raw: str | bytes | None
    kind: str = "envelope"
    """``envelope`` (malformed) or ``foreign`` (refused by ``foreign=``)."""


@dataclass(frozen=True, slots=True)
class ParsedRow:
    """A row after parsing: what it is and whose topic it is."""

    kind: Literal["ours", "cloudevent", "json", "text", "bad"]
    topic: str | None
    """The topic a reader filters it by (None: it names none it may use)."""
    value: Any
    text: str | bytes | None
    detail: str = ""


def parse_row(payload: object, arrived: str) -> ParsedRow:
    """Parse a row's payload column. ``arrived`` is the channel (notifications) or
    the ``foreign_topic`` (stream rows): the topic of a row that names none."""
    if type(payload) is not str:
        kind = type(payload).__name__
        raw = payload if isinstance(payload, bytes) else None
        return ParsedRow("bad", arrived, None, raw, f"its payload is a {kind}, not text")
    if not payload:
        # honker reads TEXT that is not UTF-8 as '': not a message anyone wrote.
        return ParsedRow("bad", arrived, None, payload, "its payload is empty or not UTF-8")
    try:
        value = from_json(payload)
    except ValueError:
        return ParsedRow("text", arrived, payload, payload)
    if type(value) is dict:
        if "alkpubsub" in value:
            topic = value.get("topic")
            return ParsedRow("ours", topic if type(topic) is str else arrived, value, payload)
        if "specversion" in value:
            topic = value.get("topic") or value.get("type")
            return ParsedRow("cloudevent", topic if type(topic) is str else arrived, value, payload)
        if all(k in value for k in _ENVELOPE_KEYS) and type(value["topic"]) is str:
            return ParsedRow("ours", value["topic"], value, payload)  # maybe ours, pre-v1
    return ParsedRow("json", arrived, value, payload)


@dataclass(frozen=True, slots=True)
class RowDecoder:
    """Turns parsed rows into Events by the rules of the module docstring."""

    location: str
    """Where rows come from (file and stream or ``notify``): the seed of foreign ids."""
    foreign: ForeignMode = "adopt"
    same_topic: bool = True
    """Refuse an envelope whose topic is not the arrival topic (notifications:
    the channel). Stream rows have no topic of their own."""

    def decode(
        self,
        row: ParsedRow,
        arrived: str,
        position: int,
        created_at: object = None,
        key: object = None,
    ) -> Event | Malformed:
        """The row's event, or why it is none."""
        kind = row.kind
        if kind == "ours":
            found, envelope = self._ours(row.value, arrived)
            if isinstance(found, Event):
                return found
            if envelope or "alkpubsub" in row.value:
                return Malformed(self._filed_under(row.topic, arrived), found, row.text)
            kind = "json"  # shaped like an old envelope but not one: foreign
        elif kind == "cloudevent":
            try:
                event = from_structured(row.text or "", topic=arrived if self.same_topic else None)
                validate_topic(event.topic)
                check_payload(event.payload, topic=event.topic)
            except (PayloadError, InvalidTopic) as exc:
                topic = self._filed_under(row.topic, arrived)
                return Malformed(topic, f"invalid CloudEvent: {exc}", row.text)
            return event
        elif kind == "bad":
            return Malformed(row.topic, row.detail, row.text)
        return self._foreign(kind, row, arrived, position, created_at, key)

    def _ours(self, value: Any, arrived: str) -> tuple[Event | str, bool]:
        """The envelope's event, or what is wrong with it and whether it is an
        envelope all the same (one naming another topic)."""
        try:
            event = Event.model_validate(value)
            check_payload(event.payload, topic=event.topic)
            validate_topic(event.topic)
        except (ValidationError, PayloadError, InvalidTopic, ValueError, TypeError) as exc:
            return _why(exc), False
        if self.same_topic and event.topic != arrived:
            return f"its envelope names topic {event.topic[:80]!r}, not {arrived!r}", True
        return event, True

    def _filed_under(self, claimed: str | None, arrived: str) -> str:
        """The topic a malformed row is dead-lettered under: its channel; in a
        stream, the topic it claims if that is one, else the foreign topic."""
        if self.same_topic or claimed is None:
            return arrived
        try:
            return validate_topic(claimed)
        except InvalidTopic:
            return arrived

    def _foreign(
        self,
        kind: str,
        row: ParsedRow,
        arrived: str,
        position: int,
        created_at: object,
        key: object,
    ) -> Event | Malformed:
        text = row.text if isinstance(row.text, str) else ""
        if self.foreign != "adopt":
            detail = f"a foreign message (foreign={self.foreign})"
            return Malformed(arrived, detail, text, "foreign")
        try:
            validate_topic(arrived)
        except InvalidTopic:
            return Malformed(None, f"a foreign message on {arrived[:80]!r}, not a topic", text)
        payload: Any = row.value
        if kind == "json":
            try:
                payload = check_payload(payload, topic=arrived)
            except PayloadError:
                payload, kind = text, "text"
        if len(text.encode(errors="replace")) > MAX_PAYLOAD_BYTES:
            return Malformed(arrived, "a foreign message beyond the payload limit", text)
        values = {
            "id": str(uuid.uuid5(_NAMESPACE, f"{self.location}/{position}")),
            "topic": arrived,
            "payload": payload,
            "headers": {FOREIGN_HEADER: kind},
            "published_at": _time(created_at),
            "origin": FOREIGN_ORIGIN,
            "key": key if type(key) is str else None,
            "offset": None,
            "wire_version": 1,
        }
        return Event._build(values)


def _why(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return (
            f"malformed event envelope ({exc.error_count()} errors, first: "
            f"{first['msg']} at {first['loc']})"
        )
    return str(exc)


def _time(created_at: object) -> datetime:
    if type(created_at) in (int, float):
        try:
            return datetime.fromtimestamp(created_at, UTC)  # type: ignore[arg-type]
        except (OverflowError, OSError, ValueError):
            pass
    return datetime.now(UTC)
