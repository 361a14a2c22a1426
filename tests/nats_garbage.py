"""Garbage that raw NATS clients write where alkpubsub subscriptions read.

Shared by tests/test_nats.py, tests/test_nats_durable.py and the
``garbage_writer`` fixtures of tests/test_conformance_nats.py. Nothing here is
what an alkpubsub publisher writes. A subscription to the topic must count each
malformed one in ``stats.malformed`` (JetStream named consumers: and
dead-letter it), adopt each foreign one as an event, and go on.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable
from typing import Any, NamedTuple

import nats
import nats.aio.client
from brokers import HOST

from alkpubsub import Event, Subscription


def envelope(topic: str, **override: Any) -> dict[str, Any]:
    """A well-formed envelope for ``topic`` as a dict, with fields replaced."""
    event, body = Event.create(topic, {"n": 1}, origin="garbage")
    fields: dict[str, Any] = json.loads(event.envelope(body))
    fields.update(override)
    return fields


def bad_bodies(topic: str) -> list[tuple[bytes, dict[str, str] | None]]:
    """(body, NATS headers) pairs on ``topic``'s subject that are malformed: not
    UTF-8, an envelope of another topic (a spoof), or JSON that claims to be our
    envelope (the ``alkpubsub`` key) and is not a valid one, or too large."""
    good = json.dumps(envelope(topic))
    return [
        (b"\xff\xfe\x80 not utf-8 \xc3\x28", None),
        (json.dumps(envelope("other:topic")).encode(), None),  # the topic disagrees
        (json.dumps(envelope(topic, id=5, headers=[1])).encode(), None),  # wrong field types
        (good.replace('{"n": 1}', "9" * 100_000).encode(), None),  # a number far out of range
        (good.replace('{"n": 1}', "[" * 100_000 + "]" * 100_000).encode(), None),  # too deep
        (good[:-40].encode(), None),  # cut short
        (b"x" * 1_040_000, None),  # larger than any payload we publish, within max_payload
        # A binary CloudEvent without its required attributes.
        (b"{}", {"ce-id": "1", "ce-specversion": "1.0"}),
    ]


def foreign_bodies() -> list[tuple[bytes, dict[str, str] | None]]:
    """(body, NATS headers) pairs another program may write: JSON values and
    UTF-8 text that are not our envelope. Adopted as events by default."""
    return [
        (b"{not json", None),
        (b"", None),
        (b"null", None),
        (b"[1, 2, 3]", None),
        (b'{"hello": "world"}', None),  # JSON, not an envelope
        (b"{" * 50_000, None),  # unterminated nesting
        # Headers that look like server status messages, on a data message.
        (b"{}", {"Status": "503", "Description": "No Responders"}),
        (b"null", {"Status": "404", "Nats-Msg-Id": ""}),
    ]


def raw_frames(subject: str) -> list[bytes]:
    """Protocol frames nats-py cannot send: headers that are not UTF-8 (and a
    body that is not either, so they are malformed, not foreign)."""
    frames = []
    for hdr in (b"NATS/1.0 \xff\xfe\r\n\r\n", b"NATS/1.0\r\nX-Bad: \xff\xfe\x80\r\n\r\n"):
        body = b"\xff{not json"
        frames.append(
            b"HPUB %s %d %d\r\n%s%s\r\n"
            % (subject.encode(), len(hdr), len(hdr) + len(body), hdr, body)
        )
    return frames


class Written(NamedTuple):
    """What :func:`write_garbage` wrote: all, the malformed ones, the foreign ones."""

    total: int
    malformed: int
    foreign: int


def settle_publisher(nc: nats.aio.client.Client) -> Awaitable[None]:
    """One round trip on a publishing connection before its first publish.

    nats-server 2.9.10 drops about 3 % of the core publishes that another
    connection sends right after a subscriber's SUB was flushed (nats-py alone:
    13 of 400 from a fresh connection, 12 of 400 from an open one); with one
    PING/PONG on the publisher's connection first, 0 of 800. A server bug, not
    ours: the tests that publish as "another program" wait for it."""
    return nc.flush()


def _pong(sock: socket.socket) -> None:
    data = b""
    while b"PONG" not in data:
        chunk = sock.recv(4096)
        if not chunk or b"-ERR" in chunk:
            raise ConnectionError(f"the server refused a frame: {data + chunk!r}")
        data += chunk


def send_raw(port: int, frames: list[bytes]) -> None:
    """Send protocol frames over a plain socket; return once the server has
    processed them (its PONG), or raise if it refused one. One PING/PONG before
    the frames, for the reason in settle_publisher."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.recv(4096)  # INFO
        sock.sendall(b'CONNECT {"verbose":false,"headers":true}\r\nPING\r\n')
        _pong(sock)
        sock.sendall(b"".join(frames) + b"PING\r\n")
        _pong(sock)


async def write_garbage(url: str, port: int, subject: str, topic: str) -> Written:
    """Publish every bad and foreign body on ``subject`` (where ``topic`` is read)
    with nats-py and the raw frames over a socket, once the server has them."""
    bodies = bad_bodies(topic)
    foreign = foreign_bodies()
    frames = raw_frames(subject)
    await asyncio.to_thread(send_raw, port, frames)
    nc = await nats.connect(url)
    try:
        await settle_publisher(nc)
        for body, headers in bodies + foreign:
            await nc.publish(subject, body, headers=headers)
        await nc.flush()
    finally:
        await nc.close()
    malformed = len(bodies) + len(frames)
    return Written(malformed + len(foreign), malformed, len(foreign))


async def wait_stored(url: str, stream: str, count: int) -> None:
    """Wait until ``stream`` holds at least ``count`` messages (JetStream stores
    what a core publish sends a little after the sender's PONG)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        async with asyncio.timeout(10):
            while (await js.stream_info(stream)).state.messages < count:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        await nc.close()


async def until_malformed(sub: Subscription, count: int) -> None:
    """Wait until ``sub`` has counted ``count`` malformed messages: garbage from
    another connection may reach us after good events published later."""
    try:
        async with asyncio.timeout(10):
            while sub.stats.malformed < count:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(
            f"{sub!r}: {sub.stats.malformed} of {count} counted malformed"
        ) from None
    assert sub.stats.malformed == count, sub.stats
