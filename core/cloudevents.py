"""CloudEvents 1.0: an :class:`Event` as a CloudEvent and back, structured or binary.

CloudEvents is the envelope of this field (Dapr wraps every pub/sub message in
it; Knative and the CNCF SDKs speak it). Transports use these functions when
their ``format`` option is ``cloudevents`` (structured mode: one JSON object)
or ``cloudevents-binary`` (attributes in message headers, the payload as the
body). The mapping (decision record 008):

=================  =============================================================
Event              CloudEvent
=================  =============================================================
``id``             ``id``
``topic``          ``type``, and the ``topic`` extension (as Dapr writes it);
                   reading prefers ``topic``, then ``type``
``payload``        ``data`` with ``datacontenttype: application/json``
``published_at``   ``time`` (RFC 3339)
``origin``         ``source`` = ``/alkpubsub/<origin>``; a foreign source is
                   kept whole as the origin
``key``            ``partitionkey`` (the Partitioning extension)
``headers``        ``traceparent``/``tracestate`` as the Distributed Tracing
                   extension; a header whose name is a valid extension name
                   (``[a-z0-9]{1,20}``, not a context attribute) as that
                   extension; any other header in the ``alkheaders`` extension
                   (a JSON object as text)
``offset``         not on the wire (it belongs to the log that stores the event)
=================  =============================================================

Unknown extensions of a foreign CloudEvent become headers (non-text values as
JSON text); ``data_base64`` becomes the payload as base64 text, with the
header ``ce-data-encoding: base64``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic_core import from_json, to_json

from .errors import PayloadError
from .event import Event, encode_payload

SPECVERSION = "1.0"
SOURCE_PREFIX = "/alkpubsub/"
CONTENT_TYPE = "application/json"
BINARY_PREFIX = "ce-"
"""Header prefix of binary mode (the HTTP, NATS and Kafka bindings use ``ce-``/``ce_``)."""

_CONTEXT = frozenset(
    {"id", "source", "specversion", "type", "datacontenttype", "dataschema", "subject", "time"}
)
_OURS = frozenset({"topic", "partitionkey", "alkheaders"})
_EXTENSION = re.compile(r"[a-z0-9]{1,20}\Z")


def _attributes(event: Event) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": event.id,
        "source": SOURCE_PREFIX + event.origin if event.origin else SOURCE_PREFIX,
        "type": event.topic,
        "time": event.published_at.isoformat().replace("+00:00", "Z"),
        "datacontenttype": CONTENT_TYPE,
        "topic": event.topic,
    }
    if event.key is not None:
        attrs["partitionkey"] = event.key
    rest: dict[str, str] = {}
    for name, value in event.headers.items():
        if _EXTENSION.match(name) and name not in _CONTEXT and name not in _OURS:
            attrs[name] = value
        else:
            rest[name] = value
    if rest:
        attrs["alkheaders"] = to_json(rest).decode()
    return attrs


def to_structured(event: Event, body: bytes | None = None) -> bytes:
    """``event`` as a structured-mode CloudEvent (JSON text). ``body`` is the
    payload's JSON when the caller has it."""
    if body is None:
        body = encode_payload(event.payload, topic=event.topic)
    return to_json(_attributes(event))[:-1] + b',"data":' + body + b"}"


def to_binary(event: Event, body: bytes | None = None) -> tuple[dict[str, str], bytes]:
    """``event`` as binary mode: ``(headers, body)``; attributes become
    ``ce-<name>`` headers, ``datacontenttype`` becomes ``content-type``."""
    if body is None:
        body = encode_payload(event.payload, topic=event.topic)
    attrs = _attributes(event)
    headers = {"content-type": attrs.pop("datacontenttype")}
    headers.update({BINARY_PREFIX + k: str(v) for k, v in attrs.items()})
    return headers, body


def from_structured(
    data: str | bytes, *, offset: int | None = None, topic: str | None = None
) -> Event:
    """Parse a structured-mode CloudEvent, or raise :class:`PayloadError`.
    ``topic`` is the topic it arrived on (see :func:`from_binary`)."""
    try:
        obj = from_json(data)
    except ValueError as exc:
        raise PayloadError(f"not a CloudEvent: invalid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise PayloadError(f"not a CloudEvent: a JSON {type(obj).__name__}, not an object")
    if "data_base64" in obj:
        payload: Any = obj.pop("data_base64")
        obj.setdefault("ce-data-encoding", "base64")
    else:
        payload = obj.pop("data", None)
    return _event(obj, payload, offset, topic)


def from_binary(
    headers: Mapping[str, str],
    body: bytes,
    *,
    offset: int | None = None,
    topic: str | None = None,
) -> Event:
    """Parse binary mode: ``ce-*`` headers (any case; ``ce_`` as Kafka and
    Redis fields write it) and the body, or raise :class:`PayloadError`.

    ``topic``, the topic of the channel or subject the message arrived on, is
    the event's topic: a ``topic`` extension that names another one is a
    spoof (:class:`PayloadError`), and a ``type`` other than the topic is kept
    in the ``ce-type`` header. Without it the topic is the ``topic``
    extension, else the ``type``."""
    attrs: dict[str, Any] = {}
    content_type = CONTENT_TYPE
    for name, value in headers.items():
        lower = name.lower()
        if lower[:3] in ("ce-", "ce_"):
            attrs[lower[3:]] = value
        elif lower == "content-type":
            content_type = value
    attrs["datacontenttype"] = content_type
    if content_type.split(";")[0].strip().endswith("json"):
        try:
            payload: Any = from_json(body) if body else None
        except ValueError as exc:
            raise PayloadError(
                f"CloudEvent body is not the JSON its content-type says ({exc})"
            ) from None
    else:
        try:
            payload = body.decode()
        except UnicodeDecodeError:
            payload = base64.b64encode(body).decode()
            attrs["ce-data-encoding"] = "base64"
    return _event(attrs, payload, offset, topic)


def _event(attrs: dict[str, Any], payload: Any, offset: int | None, arrived: str | None) -> Event:
    missing = [a for a in ("id", "source", "specversion", "type") if not attrs.get(a)]
    if missing:
        raise PayloadError(f"not a CloudEvent: required attribute {missing[0]!r} is missing")
    if attrs["specversion"] != SPECVERSION:
        raise PayloadError(
            f"CloudEvent specversion {attrs['specversion']!r} is not supported; only 1.0 is"
        )
    for name in ("id", "source", "type"):
        if not isinstance(attrs[name], str):
            raise PayloadError(f"CloudEvent attribute {name!r} must be a string")
    source: str = attrs["source"]
    origin = source[len(SOURCE_PREFIX) :] if source.startswith(SOURCE_PREFIX) else source
    headers: dict[str, str] = {}
    named = attrs.get("topic")
    if arrived is None:
        topic = named or attrs["type"]
    else:
        if named and named != arrived:
            raise PayloadError(
                f"CloudEvent {attrs['id']!r} names topic {named!r} but arrived on {arrived!r}"
            )
        topic = arrived
        if attrs["type"] != arrived:
            headers["ce-type"] = attrs["type"]
    extra = attrs.get("alkheaders")
    if isinstance(extra, str):
        try:
            decoded = from_json(extra)
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            headers.update({k: v for k, v in decoded.items() if isinstance(v, str)})
    for name, value in attrs.items():
        if name in _CONTEXT or name in _OURS:
            continue
        headers[name] = value if isinstance(value, str) else to_json(value).decode()
    key = attrs.get("partitionkey")
    values = {
        "id": attrs["id"],
        "topic": topic,
        "payload": payload,
        "headers": headers,
        "published_at": _time(attrs.get("time")),
        "origin": origin,
        "key": key if isinstance(key, str) else None,
        "offset": offset,
    }
    try:
        return Event.model_validate(values)
    except ValueError as exc:
        raise PayloadError(f"CloudEvent {attrs['id']!r} cannot be an event: {exc}") from None


def _time(value: Any) -> datetime:
    if not isinstance(value, str):
        # CloudEvents makes time optional; the receive time is the best we have.
        return datetime.now(UTC)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PayloadError(f"CloudEvent time {value!r} is not RFC 3339") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
