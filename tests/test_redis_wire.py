"""The ``redis://`` subscriber's own RESP2 connection (``_redis_wire.py``):
frames split anywhere by the kernel, and a handler that fails on one frame.
"""

from __future__ import annotations

import random

import pytest
from brokers import RedisServer
from redis.exceptions import ResponseError

from alkpubsub.config import parse_url
from alkpubsub.conformance.restart import wait_until
from alkpubsub.transports._redis_common import redis_target
from alkpubsub.transports._redis_wire import Frame, PubSubWire, open_wire, pack


async def test_frames_split_anywhere_are_read_whole_and_in_order() -> None:
    # Whatever sizes the kernel hands over (a byte, or a large frame spread
    # over many reads), each frame is read once, whole, in order.
    frames: list[object] = [
        [b"subscribe", b"p:a", 1],
        [b"message", b"p:a", b"x" * 200_000],
        [b"pmessage", b"p:*", b"p:a:b", b"{}"],
        [b"pong", b""],
        b"OK",
        [b"message", b"p:a", b""],
        [b"message", b"p:a", b"\r\n\xff" * 30_000],
        None,
    ]

    def encode(value: object) -> bytes:
        if isinstance(value, list):
            return b"*%d\r\n" % len(value) + b"".join(encode(v) for v in value)
        if isinstance(value, int):
            return b":%d\r\n" % value
        if value is None:
            return b"$-1\r\n"
        assert isinstance(value, bytes)
        return b"$%d\r\n%b\r\n" % (len(value), value)

    def feed(frames: list[object], sizes: list[int] | None, rng: random.Random) -> None:
        stream = b"".join(encode(f) for f in frames) + b"-ERR refused\r\n+OK\r\n"
        got: list[object] = []
        wire = PubSubWire(got.append)
        at = 0
        while at < len(stream):
            size = rng.choice(sizes) if sizes else rng.randint(1, 400_000)
            room = wire.get_buffer(-1)
            chunk = stream[at : at + min(size, len(room))]
            room[: len(chunk)] = chunk
            wire.buffer_updated(len(chunk))
            at += len(chunk)
        assert got[:-2] == frames
        assert isinstance(got[-2], ResponseError) and str(got[-2]) == "ERR refused"
        assert got[-1] == b"OK"
        assert wire.frames == len(frames) + 2

    rng = random.Random(7)
    small = [f for f in frames if len(encode(f)) < 1000]
    feed(small, [1], rng)  # a split after every byte
    feed(frames, [1, 2, 7, 64, 5_000, 70_001], rng)  # large frames over many reads
    feed(frames, None, rng)  # reads of random sizes up to 400 kB


async def test_a_frame_whose_handling_fails_costs_neither_the_connection_nor_later_frames(
    redis_server_session: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[Frame] = []

    def handle(frame: Frame) -> None:
        if frame == [b"message", b"w:a", b"boom"]:
            raise RuntimeError("a bug in the handler")
        got.append(frame)

    wire = await open_wire(redis_target(parse_url(redis_server_session.url), None), 5, handle)
    wire.send(pack(b"SUBSCRIBE", b"w:a"))
    await wait_until(lambda: len(got) == 1, 5, "subscribed")
    for data in (b"boom", b"after"):
        redis_server_session.call("PUBLISH", "w:a", data)
    await wait_until(lambda: len(got) == 2, 5, "the frame after the failing one")
    assert got[1] == [b"message", b"w:a", b"after"] and wire.connected
    assert "handling a pub/sub frame failed" in caplog.text
    wire.abort()
