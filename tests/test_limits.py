"""The publish limits (alkpubsub.limits), one test per way a payload used to be
accepted and then not delivered, or refused with a raw exception."""

from __future__ import annotations

import math

import pytest

import alkpubsub
from alkpubsub import PayloadError, PubSubError
from alkpubsub.limits import MAX_DEPTH, MAX_INT, MIN_INT, check_payload


def nested(depth: int) -> object:
    value: object = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (nested(200), "deeper than 100"),  # every reader failed to decode it
        (nested(MAX_DEPTH + 1), "deeper than 100"),
        (10**5000, "64-bit"),  # raw ValueError: number out of range
        (MAX_INT + 1, "64-bit"),
        (MIN_INT - 1, "64-bit"),
        ({"x": math.nan}, "cannot represent"),  # went on the wire as NaN
        ([math.inf], "cannot represent"),
        ({1: "a", "1": "b"}, "keys are text"),  # silently became {"1": "b"}
        (1j, "not a JSON value"),  # became the string "1j"
        ({"when": b"\xff"}, "not a JSON value"),
    ],
    ids=[
        "depth-200",
        "depth-101",
        "10**5000",
        "2**64",
        "-2**63-1",
        "nan",
        "inf",
        "int-key-collision",
        "complex",
        "bytes",
    ],
)
async def test_undeliverable_payloads_are_refused_at_publish(payload: object, says: str) -> None:
    transport = await alkpubsub.connect("memory://")
    try:
        with pytest.raises(PayloadError, match=says):
            await transport.publish("a:b", payload)
    finally:
        await transport.close()


@pytest.mark.parametrize(
    "kwargs",
    [{"key": 5}, {"key": ""}, {"headers": "abc"}, {"headers": {"a b": "x"}}, {"headers": {"h": 1}}],
    ids=repr,
)
async def test_bad_keys_and_headers_are_payload_errors(kwargs: dict[str, object]) -> None:
    transport = await alkpubsub.connect("memory://")
    try:
        with pytest.raises(PayloadError):
            await transport.publish("a:b", 1, **kwargs)  # type: ignore[arg-type]
    finally:
        await transport.close()


@pytest.mark.parametrize("items", [[1], [("a:b", 1, 2)], None, "ab", [("a:b",)], 5], ids=repr)
async def test_malformed_publish_many_items_are_pubsub_errors(items: object) -> None:
    transport = await alkpubsub.connect("memory://")
    try:
        with pytest.raises(PubSubError):
            await transport.publish_many(items)  # type: ignore[arg-type]
    finally:
        await transport.close()


def test_the_boundaries_themselves_are_accepted() -> None:
    value = {"deep": nested(MAX_DEPTH - 1), "ints": [MIN_INT, MAX_INT], "f": 1.5e308}
    assert check_payload(value) is value
