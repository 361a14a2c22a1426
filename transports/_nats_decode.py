"""Reading and writing a NATS message as an event, for both NATS transports.

Writing follows the ``format`` option: our envelope (``alkpubsub``), a
structured CloudEvent (``cloudevents``) or a binary one (``cloudevents-binary``:
``ce-*`` NATS headers and the payload's JSON as the body).

Reading accepts every format, whatever ``format`` says, in this order:

1. a message with a ``ce-``/``ce_`` header is a binary CloudEvent;
2. our envelope (with or without the ``"alkpubsub"`` marker);
3. a JSON object with ``specversion`` is a structured CloudEvent;
4. anything else that is a JSON value or UTF-8 text is *foreign*: with
   ``foreign=adopt`` it becomes an event (:func:`adopt`).

Malformed (:class:`~alkpubsub.PayloadError`): bytes that are not UTF-8, JSON
that claims to be ours (has the ``alkpubsub`` key) but is not a valid
envelope, a CloudEvent that is not valid, an event whose topic is not the
subject's (one topic per message: a spoof), and whatever breaks the publish
limits (so that what is delivered can be published again).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic_core import from_json

from alkpubsub.cloudevents import from_binary, from_structured, to_binary, to_structured
from alkpubsub.errors import PayloadError
from alkpubsub.event import Event
from alkpubsub.limits import MAX_PAYLOAD_BYTES, check_payload

Format = Literal["alkpubsub", "cloudevents", "cloudevents-binary"]
Foreign = Literal["adopt", "dead_letter", "drop"]

FOREIGN_HEADER = "x-alk-foreign"
FOREIGN_ORIGIN = "foreign"
_NAMESPACE = uuid.UUID("3d0f6f0e-5b8a-4c1e-9e2f-5a7b1c2d4e60")
_MARKER = b'"alkpubsub"'


def encode(event: Event, body: bytes, fmt: Format) -> tuple[bytes, dict[str, str] | None]:
    """The message data and NATS headers (None: none) for ``event`` in ``fmt``."""
    if fmt == "alkpubsub":
        return event.envelope(body), None
    if fmt == "cloudevents":
        return to_structured(event, body), None
    headers, data = to_binary(event, body)
    return data, headers


def headers_size(headers: Mapping[str, str] | None) -> int:
    """Bytes the NATS header block of ``headers`` takes (``NATS/1.0`` line and all)."""
    if not headers:
        return 0
    return 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


def foreign_id(seed: str) -> str:
    """A deterministic event id for a foreign message: the same message read again
    (a redelivery, another subscription) gets the same id."""
    return str(uuid.uuid5(_NAMESPACE, seed))


def decode(
    data: bytes,
    headers: Mapping[str, str] | None,
    topic: str,
    *,
    offset: int | None = None,
) -> Event | None:
    """The event in a message that arrived on ``topic``'s subject; None when it
    is foreign (see :func:`adopt`); :class:`PayloadError` when malformed."""
    if headers and any(k[:3].lower() in ("ce-", "ce_") for k in headers):
        event = from_binary(headers, data, offset=offset, topic=topic)
        check_payload(event.payload, topic=topic)
        return event
    try:
        event = Event.from_json(data, offset=offset)
    except PayloadError as exc:
        error = exc
    else:
        if event.topic != topic:
            # We publish each event on its topic's subject: anything else is a spoof.
            raise PayloadError(f"an envelope for {event.topic!r} arrived on {topic!r}'s subject")
        return event
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise PayloadError("the message is not UTF-8 text (nor an event)") from None
    try:
        value = from_json(data)
    except ValueError:
        if _MARKER in data and text.lstrip().startswith("{"):
            raise error from None  # broken JSON that claims to be our envelope
        return None
    if isinstance(value, dict):
        if "alkpubsub" in value:
            raise error
        if "specversion" in value:
            event = from_structured(data, offset=offset, topic=topic)
            check_payload(event.payload, topic=topic)
            return event
    return None


def adopt(
    data: bytes,
    topic: str,
    *,
    seed: str,
    offset: int | None = None,
    published_at: datetime | None = None,
) -> Event:
    """A foreign message (one :func:`decode` returned None for) as an event:
    topic = the arrival topic, id = :func:`foreign_id` of ``seed``, payload = the
    parsed JSON if it passes the publish limits, else the text; header
    ``x-alk-foreign: json`` or ``text``; origin ``foreign``; ``published_at``
    the broker's time if known, else now."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadError(
            f"a foreign message of {len(data)} bytes is over the payload limit of "
            f"{MAX_PAYLOAD_BYTES} bytes"
        )
    payload: Any = data.decode()  # decode() made sure it is UTF-8
    kind = "text"
    with contextlib.suppress(ValueError):  # PayloadError is a ValueError too
        payload, kind = check_payload(from_json(data), topic=topic), "json"
    return Event.model_validate(
        {
            "id": foreign_id(seed),
            "topic": topic,
            "payload": payload,
            "headers": {FOREIGN_HEADER: kind},
            "published_at": published_at or datetime.now(UTC),
            "origin": FOREIGN_ORIGIN,
            "offset": offset,
        }
    )
