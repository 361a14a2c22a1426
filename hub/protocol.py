"""The hub/spoke frame protocol, version 1 (``docs/hub-protocol.md``).

A frame is one WebSocket message (text, or binary holding UTF-8): a JSON object,
the **header**, and for frames that carry events, a newline and then the
events' wire-format envelopes (``docs/wire-format.md``), one per line. Compact
JSON has no raw newline, so the first newline ends the header, and each
envelope is parsed once, straight into an :class:`~alkpubsub.Event`.

The WebSocket subprotocol ``alkpubsub.v1`` names the version; a hub and a spoke
that share no version do not connect.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

from pydantic_core import to_json

from alkpubsub.errors import PubSubError
from alkpubsub.event import Event
from alkpubsub.limits import MAX_PAYLOAD_BYTES

SUBPROTOCOL = "alkpubsub.v1"
VERSION = 1

MAX_HEADER_BYTES = 16 * 1024
"""A frame's JSON header (before the first newline)."""
MAX_FRAME_BYTES = 4 * 1024 * 1024
"""A whole frame; a publish of several events is split to stay under it."""
MAX_BATCH = 256
"""Events in one publish frame."""
MAX_ID = 2**53
"""Request ids are JSON integers 0..2**53 (exact in every JSON reader)."""

# Close codes (RFC 6455 leaves 4000-4999 to applications).
CLOSE_UNAUTHORIZED = 4401
CLOSE_PROTOCOL = 4400
CLOSE_TOO_SLOW = 4408
CLOSE_HUB_CLOSING = 4503

CLIENT_OPS = frozenset({"publish", "subscribe", "unsubscribe", "credit", "ack", "nack", "ping"})
HUB_OPS = frozenset(
    {"welcome", "published", "subscribed", "unsubscribed", "event", "error", "ended", "pong"}
)

# Error codes in "error" and "ended" frames.
BAD_FRAME = "bad_frame"
"""The frame is not JSON, too big, or misses a field: nothing of it was done."""
NOT_ALLOWED = "not_allowed"
"""The token's grant does not cover the topic or pattern."""
INVALID = "invalid"
"""A topic, pattern, payload, consumer or start the hub's transport refused."""
BUSY = "busy"
"""The consumer name has a live subscriber that does not share (ConsumerBusy)."""
UNAVAILABLE = "unavailable"
"""The hub's transport failed (a broker down, a store closed)."""


class FrameError(PubSubError):
    """A frame that cannot be read. ``code`` is one of the error codes above;
    ``request`` the frame's ``id`` when it had one."""

    def __init__(self, code: str, message: str, *, request: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request = request


_FIELDS: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    # op -> field -> (types, required)
    "publish": {"id": (int, True)},
    "subscribe": {
        "id": (int, True),
        "sub": (str, True),
        "pattern": (str, True),
        "consumer": ((str, type(None)), False),
        "start": ((str, int), False),
        "credit": (int, True),
    },
    "unsubscribe": {"sub": (str, True), "id": (int, False)},
    "credit": {"sub": (str, True), "n": (int, True)},
    "ack": {"sub": (str, True), "event": (str, True)},
    "nack": {
        "sub": (str, True),
        "event": (str, True),
        "delay": ((int, float), False),
        "reason": ((str, type(None)), False),
    },
    "ping": {"id": (int, False)},
    "welcome": {"v": (int, True), "tenant": (str, True)},
    "published": {"id": (int, True), "offsets": (list, True)},
    "subscribed": {"id": (int, True), "sub": (str, True)},
    "unsubscribed": {"sub": (str, True)},
    "event": {"sub": (str, True)},
    "error": {"code": (str, True), "message": (str, True)},
    "ended": {"sub": (str, True), "code": (str, True), "message": (str, True)},
    "pong": {"id": (int, False)},
}


def decode(data: str | bytes, ops: frozenset[str]) -> tuple[dict[str, Any], list[bytes]]:
    """A frame's header and its envelopes' raw lines; :class:`FrameError` if the
    header is not a JSON object of a known ``op`` in ``ops`` with its fields."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_FRAME_BYTES:
        raise FrameError(BAD_FRAME, f"frame of {len(raw)} bytes; the limit is {MAX_FRAME_BYTES}")
    head, _, rest = raw.partition(b"\n")
    if len(head) > MAX_HEADER_BYTES:
        raise FrameError(
            BAD_FRAME, f"frame header of {len(head)} bytes; the limit is {MAX_HEADER_BYTES}"
        )
    try:
        header = json.loads(head)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise FrameError(BAD_FRAME, "the frame header is not JSON") from None
    if not isinstance(header, dict):
        raise FrameError(BAD_FRAME, "the frame header is not a JSON object")
    request = header.get("id")
    request = request if type(request) is int else None
    op = header.get("op")
    if not isinstance(op, str) or op not in ops:
        raise FrameError(
            BAD_FRAME, f"unknown op {op!r}; expected one of {sorted(ops)}", request=request
        )
    for name, (types, required) in _FIELDS[op].items():
        if name not in header:
            if required:
                raise FrameError(BAD_FRAME, f"{op} frame without {name!r}", request=request)
            continue
        value: Any = header[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise FrameError(BAD_FRAME, f"{op} frame: {name!r} has the wrong type", request=request)
        if name in ("id", "credit", "n") and not 0 <= cast(int, value) <= MAX_ID:
            raise FrameError(BAD_FRAME, f"{op} frame: {name!r} out of range", request=request)
    lines = rest.split(b"\n") if rest else []
    if len(lines) > MAX_BATCH:
        raise FrameError(
            BAD_FRAME,
            f"{len(lines)} events in one frame; the limit is {MAX_BATCH}",
            request=request,
        )
    return header, lines


def encode(header: dict[str, Any], envelopes: Sequence[bytes] = ()) -> bytes:
    """A frame: the header's compact JSON, then each envelope on its own line."""
    head = to_json(header)
    if not envelopes:
        return head
    return b"\n".join([head, *envelopes])


def read_event(line: bytes, *, offset: int | None = None) -> Event:
    """One envelope line as an event (``PayloadError`` if malformed)."""
    return Event.from_json(line, offset=offset)


def error_frame(
    code: str, message: str, *, request: int | None = None, sub: str | None = None
) -> bytes:
    header: dict[str, Any] = {"op": "error", "code": code, "message": message}
    if request is not None:
        header["id"] = request
    if sub is not None:
        header["sub"] = sub
    return encode(header)


ENVELOPE_LIMIT = MAX_PAYLOAD_BYTES + 64 * 1024
"""An envelope line: the payload limit plus room for the envelope's other fields."""
