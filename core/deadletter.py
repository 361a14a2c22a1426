"""Dead letters: built by one function, the same on every durable transport.

An event that failed ``max_deliveries`` times, or a message that is not an
event at all, is written to ``dead:<original topic>`` (the reserved first
segment ``dead``; see :func:`alkpubsub.topics.dead_letter_topic`). Only
patterns that name ``dead`` first match it, so a consumer on ``orders:>`` never
receives its own dead letters, and a dead letter is never dead-lettered again:
one that keeps failing is redelivered (after the nack delay), never copied.

Every dead letter carries these headers (besides the original event's own,
when they fit in :data:`~alkpubsub.limits.MAX_HEADERS_BYTES`):

=====================  ====================================================
``x-dead-reason``      why (the handler's ``nack(reason=)``, the decode error)
``x-dead-kind``        ``event`` (it failed) or ``malformed`` (not an event)
``x-deliveries``       how many times it was delivered
``x-consumer``         the consumer that gave up on it
``x-original-id``      the event's id (empty for a malformed message)
``x-original-topic``   the topic it was published to or arrived on
``x-original-offset``  its position in the durable log, when known
=====================  ====================================================

The payload is the original event's payload; for a malformed message, its
text (undecodable bytes replaced), at most :data:`MAX_RAW_CHARS` characters,
with ``x-dead-truncated: true`` when cut. The dead letter's id is derived from
the original's id (or text) and the consumer, so writing the same dead letter
twice after a crash gives the same id (JetStream deduplicates it), while two
malformed messages with the same text at different positions get two ids.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic_core import to_json

from .event import Event, encode_payload
from .limits import MAX_HEADERS_BYTES
from .topics import dead_letter_topic, is_dead_letter

MAX_RAW_CHARS = 65_536
"""Characters of a malformed message kept in its dead letter."""
MAX_REASON_CHARS = 500
_NAMESPACE = uuid.UUID("6f1c3b7e-0d2a-4c55-9a57-6b8f4a1d2e90")
_LINE_BREAKS = re.compile(r"[\r\n\x00]+")


def should_dead_letter(topic: str, deliveries: int, max_deliveries: int) -> bool:
    """True when an event of ``topic`` delivered ``deliveries`` times has used
    up its deliveries. Never for a dead letter: it is redelivered instead."""
    return deliveries >= max_deliveries and not is_dead_letter(topic)


def _reason(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text)[:MAX_REASON_CHARS]


def dead_letter(
    *,
    topic: str,
    reason: str,
    origin: str,
    event: Event | None = None,
    raw: bytes | str | None = None,
    deliveries: int = 1,
    consumer: str | None = None,
    offset: int | None = None,
) -> tuple[Event, bytes]:
    """The dead letter (event, payload JSON) for ``event`` that failed, or for the
    malformed message ``raw`` that arrived on ``topic``. ``topic`` is the
    original topic; the dead letter goes to ``dead:<topic>``."""
    if not topic:
        topic = "unknown"  # a message whose channel or row names no topic
    headers: dict[str, str] = {}
    if event is not None:
        payload: Any = event.payload
        kind, original_id = "event", event.id
        size = sum(len(k) + len(v.encode()) for k, v in event.headers.items())
        if size + 1024 <= MAX_HEADERS_BYTES:
            headers.update(event.headers)
        else:
            headers["x-dead-headers"] = "dropped: too large to keep beside the reasons"
        seed = original_id
        if offset is None:
            offset = event.offset
    else:
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else (raw or "")
        payload = text[:MAX_RAW_CHARS]
        if len(text) > MAX_RAW_CHARS:
            headers["x-dead-truncated"] = "true"
        kind, original_id = "malformed", ""
        # Two malformed messages with the same text are two dead letters (a
        # broker deduplicating by id would keep one): the position tells them
        # apart, and writing the same one again after a crash keeps its id.
        digest = hashlib.sha256(text.encode(errors="replace")).hexdigest()
        seed = digest if offset is None else f"{offset}/{digest}"
    headers.update(
        {
            "x-dead-reason": _reason(reason),
            "x-dead-kind": kind,
            "x-deliveries": str(deliveries),
            "x-consumer": consumer or "",
            "x-original-id": original_id,
            "x-original-topic": topic,
        }
    )
    if offset is not None:
        headers["x-original-offset"] = str(offset)
    body = encode_payload(payload, topic=topic) if event is not None else to_json(payload)
    letter = Event._build(
        {
            "id": str(uuid.uuid5(_NAMESPACE, f"{consumer or ''}/{seed}")),
            "topic": dead_letter_topic(topic),
            "payload": payload,
            "headers": headers,
            "published_at": datetime.now(UTC),
            "origin": origin,
            "key": event.key if event is not None else None,
            "offset": None,
            "wire_version": 1,
        }
    )
    return letter, body
