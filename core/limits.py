"""What a publish may carry: the same limits on every transport, checked at publish.

Nothing is accepted that some reader cannot decode. Each limit below was set by
a reader that would otherwise fail on an event we had already accepted:

- ``MAX_PAYLOAD_BYTES``: NATS's default ``max_payload`` is 1 MiB for the whole
  message; a 1,000,000-byte payload plus the envelope's head (topic, headers,
  key: at most ~17.5 KiB) and our NATS headers fits in it. Redis closes a
  subscriber whose output buffer passes 32 MB, so large messages also cost
  other subscribers their connection there.
- ``MAX_DEPTH``: pydantic-core's JSON parser, which every reader uses, stops
  at ~200 levels, and other languages' parsers at 128 (Rust's serde_json);
  100 levels of payload plus the envelope stays below both.
- Integers: outside 64 bits they are not portable (Go, Rust and SQLite's JSON
  functions refuse or round them) and pydantic-core refuses ~10**4300 and up.
- Floats: NaN and Infinity have no standard JSON form.
- Object keys: JSON keys are text; ``{1: "a", "1": "b"}`` would collapse.
- Headers: ``str -> str``; names are HTTP tokens and values have no CR, LF or
  NUL, so they map onto NATS headers and CloudEvents binary mode unchanged.

A payload may be a dict (``str`` keys), list, tuple, str, int, float, bool,
None, nested, or a pydantic model (dumped with ``model_dump(mode="json")``).
Anything else (datetime, UUID, bytes, set, complex, ...) is refused with
:class:`PayloadError`, so what a subscriber receives is what was published.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel

from .errors import PayloadError

MAX_PAYLOAD_BYTES = 1_000_000
"""Largest payload, as its compact JSON text in UTF-8, on every transport by default."""
MAX_DEPTH = 100
"""Deepest nesting of lists and objects in a payload (a flat dict is depth 1)."""
MAX_HEADERS_BYTES = 16_384
"""Largest total size of header names and values (UTF-8)."""
MAX_HEADER_NAME_LENGTH = 128
"""Longest header name."""
MAX_KEY_LENGTH = 512
"""Longest ``key=`` (partition/ordering key)."""
MIN_INT = -(2**63)
"""Smallest integer a payload may hold."""
MAX_INT = 2**64 - 1
"""Largest integer a payload may hold."""

_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}\Z")
_BAD_VALUE_CHARS = re.compile(r"[\r\n\x00]")
_SCALARS = (str, bool, type(None))


def _where(topic: str) -> str:
    return f" for topic {topic!r}" if topic else ""


def _path(path: list[str | int]) -> str:
    return "payload" + "".join(f"[{p!r}]" for p in path)


def check_payload(payload: Any, *, topic: str = "") -> Any:
    """Return ``payload`` as plain JSON data, or raise :class:`PayloadError`
    naming where it breaks a rule (see the module docstring) and the fix."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    kind = type(payload)
    if kind is str or kind is bool or payload is None:
        return payload
    if not _valid(payload, 0):
        # Not known valid: walk it again, slowly, to say where and why.
        _walk(payload, [], topic)
    return payload


def _valid(value: Any, depth: int) -> bool:
    """True when ``value`` is plain JSON data within the limits; False when it is
    not, or might not be (a model, a subclass): then :func:`_walk` decides.
    No paths, no messages: ~0.15 us per value where ``_walk`` takes ~0.5 us."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(MIN_INT <= value <= MAX_INT)
    if kind is float:
        return bool(value - value == 0.0)  # false for NaN and +-Infinity
    if depth >= MAX_DEPTH:
        return False
    if kind is dict:
        for k, v in value.items():
            if type(k) is not str:
                return False
            t = type(v)
            if t is str or t is bool or v is None:
                continue
            if not _valid(v, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        for v in value:
            t = type(v)
            if t is str or t is bool or v is None:
                continue
            if not _valid(v, depth + 1):
                return False
        return True
    return False


FLAT = 2
""":func:`classify`: a dict of ``str`` keys and valid scalars only."""
NESTED = 1
""":func:`classify`: valid plain JSON data with lists or objects inside."""
UNKNOWN = 0
""":func:`classify`: invalid, or not plain data (a model): :func:`check_payload` decides."""


def classify(payload: dict[Any, Any]) -> int:
    """One pass over a dict payload: :data:`FLAT`, :data:`NESTED` or :data:`UNKNOWN`.
    A flat dict of scalars can be snapshotted with a shallow copy."""
    flat = True
    for k, v in payload.items():
        t = type(v)
        if type(k) is not str:
            return UNKNOWN
        if t is str or t is bool or v is None:
            continue
        if t is int:
            if MIN_INT <= v <= MAX_INT:
                continue
            return UNKNOWN
        if t is float:
            if v - v == 0.0:  # false for NaN and +-Infinity
                continue
            return UNKNOWN
        if not _valid(v, 1):
            return UNKNOWN
        flat = False
    return FLAT if flat else NESTED


def _check_number(value: int | float, path: list[str | int], topic: str) -> None:
    if type(value) is int:
        if not MIN_INT <= value <= MAX_INT:
            digits = len(str(abs(value))) if abs(value) < 10**4000 else "4000+"
            raise PayloadError(
                f"{_path(path)}{_where(topic)} is an integer of {digits} digits, outside "
                f"the 64-bit range [-2**63, 2**64-1] that every reader can decode; "
                "send it as a string"
            )
    elif not math.isfinite(value):
        raise PayloadError(
            f"{_path(path)}{_where(topic)} is {value!r}, which JSON cannot represent; "
            "send null or a string instead"
        )


def _walk(value: Any, path: list[str | int], topic: str) -> None:
    kind = type(value)
    if kind in _SCALARS:
        return
    if kind is int or kind is float:
        _check_number(value, path, topic)
        return
    if isinstance(value, BaseModel):
        raise PayloadError(
            f"{_path(path)}{_where(topic)} is a {kind.__name__} model nested in plain data; "
            "call model_dump(mode='json') on it, or publish the model itself"
        )
    if len(path) >= MAX_DEPTH:
        raise PayloadError(
            f"payload{_where(topic)} is nested deeper than {MAX_DEPTH} levels (or refers to "
            f"itself) at {_path(path[:3])}...; flatten it or send the inner part as a JSON string"
        )
    if kind is dict or isinstance(value, dict):
        for k, v in value.items():
            if type(k) is not str:
                raise PayloadError(
                    f"{_path(path)}{_where(topic)} has the key {k!r} "
                    f"({type(k).__name__}); JSON object keys are text: use str keys"
                )
            path.append(k)
            _walk(v, path, topic)
            path.pop()
        return
    if kind is list or kind is tuple or isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            path.append(i)
            _walk(v, path, topic)
            path.pop()
        return
    if isinstance(value, (int, float)):  # subclasses (IntEnum, numpy scalars are not)
        _check_number(int(value) if isinstance(value, int) else float(value), path, topic)
        return
    if isinstance(value, str):
        return
    raise PayloadError(
        f"{_path(path)}{_where(topic)} is a {kind.__name__}, which is not a JSON value; "
        "pass dicts (str keys), lists, str, int, float, bool or None, or a pydantic model "
        "(convert datetimes, UUIDs, bytes and sets to str or lists first)"
    )


def check_headers(headers: Any) -> dict[str, str]:
    """Return a copy of ``headers`` if it is a valid ``str -> str`` mapping,
    else raise :class:`PayloadError` naming the header and the rule."""
    if not isinstance(headers, dict):
        raise PayloadError(
            f"headers={headers!r} must be a dict of str -> str (got {type(headers).__name__})"
        )
    total = 0
    for k, v in headers.items():
        if type(k) is not str or type(v) is not str:
            raise PayloadError(
                f"header {k!r}: {v!r} is not str -> str; convert header names and values to text"
            )
        if not _HEADER_NAME.match(k):
            raise PayloadError(
                f"header name {k[:60]!r} must be 1..{MAX_HEADER_NAME_LENGTH} characters of "
                "letters, digits and !#$%&'*+.^_`|~- (an HTTP token); rename it"
            )
        if _BAD_VALUE_CHARS.search(v):
            raise PayloadError(
                f"header {k!r} contains CR, LF or NUL; headers travel as one line each "
                "on some brokers: remove those characters or encode the value"
            )
        try:
            total += len(k) + len(v.encode())
        except UnicodeEncodeError:
            raise PayloadError(
                f"header {k!r} is not valid Unicode text (lone surrogate); fix its value"
            ) from None
    if total > MAX_HEADERS_BYTES:
        raise PayloadError(
            f"headers total {total} bytes; the limit is {MAX_HEADERS_BYTES}: "
            "put large values in the payload"
        )
    return dict(headers)


def check_key(key: Any) -> str | None:
    """Return ``key`` if it is None or a valid key, else raise :class:`PayloadError`."""
    if key is None:
        return None
    if type(key) is not str:
        raise PayloadError(
            f"key={key!r} must be a str (got {type(key).__name__}); convert it, e.g. key=str(n)"
        )
    if not 1 <= len(key) <= MAX_KEY_LENGTH or _BAD_VALUE_CHARS.search(key):
        raise PayloadError(
            f"key={key[:60]!r} must be 1..{MAX_KEY_LENGTH} characters without CR, LF or NUL"
        )
    try:
        key.encode()
    except UnicodeEncodeError:
        raise PayloadError(f"key={key[:60]!r} is not valid Unicode text") from None
    return key


def check_size(body: bytes, limit: int, *, topic: str = "") -> None:
    """Raise :class:`PayloadError` if the payload JSON ``body`` is over ``limit`` bytes."""
    if len(body) > limit:
        raise PayloadError(
            f"payload{_where(topic)} is {len(body)} bytes of JSON; this transport accepts at "
            f"most {limit}: store large data elsewhere (a file, a row) and publish a reference"
        )
