"""Payload limits on both NATS transports: the server's ``max_payload`` and a
stream's ``max_msg_size`` lower ``max_payload_bytes`` after connect, and a
message the server would refuse is a ``PayloadError`` at publish."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import nats
import pytest
from brokers import NatsServer
from nats.js.api import StreamConfig

import alkpubsub
from alkpubsub import PayloadError, Transport
from alkpubsub.conformance import collect, unique
from alkpubsub.limits import MAX_HEADERS_BYTES, MAX_KEY_LENGTH, MAX_PAYLOAD_BYTES

SMALL = 65_536
"""The small server's max_payload."""
# What is left for a payload on it: 17,664 bytes are kept for the largest
# envelope head, plus 63 for JetStream's Nats-Msg-Id header.
FITS = {"nats": SMALL - 17_664, "nats+durable": SMALL - 17_664 - 63}
LONGEST_TOPIC = ":".join(["t" * 127] * 4)  # 511 characters
HEADERS = {"h" * 128: "v" * (MAX_HEADERS_BYTES - 128)}


@pytest.fixture(scope="module")
def small_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    folder = tmp_path_factory.mktemp("small")
    conf = folder / "small.conf"
    conf.write_text(f"max_payload: {SMALL}\n")
    with NatsServer(
        base_dir=folder / "nats", user="alice", password="s3cret-pw", extra_args=["-c", str(conf)]
    ) as server:
        yield server


def url_for(server: NatsServer, scheme: str) -> str:
    if scheme == "nats":
        return f"{server.url}?prefix={unique('p')}"
    return f"{server.url.replace('nats://', 'nats+durable://')}?stream={unique('S')}"


@pytest.mark.parametrize("scheme", ["nats", "nats+durable"])
async def test_small_server_max_payload_lowers_the_limit_and_the_largest_fits(
    small_nats: NatsServer, scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: max_payload_bytes stayed 1,000,000 and a 60 kB payload reached
    # nats-py, whose MaxPayloadError did not say the limit.
    caplog.set_level(logging.INFO)
    transport: Transport = await alkpubsub.connect(url_for(small_nats, scheme))
    try:
        limit = transport.max_payload_bytes
        assert limit == FITS[scheme]
        largest = "x" * (limit - 2)  # a JSON string: two quotes
        async with transport.subscribe(LONGEST_TOPIC) as sub:
            with pytest.raises(PayloadError, match=f"at most {limit}"):
                await transport.publish(LONGEST_TOPIC, largest + "x")
            # The largest payload with the longest topic and key and the most headers.
            key = "k" * MAX_KEY_LENGTH
            sent = await transport.publish(LONGEST_TOPIC, largest, headers=HEADERS, key=key)
            [got] = await collect(sub, 1)
        assert got.id == sent.id and got.payload == largest and got.headers == HEADERS
    finally:
        await transport.close()
    lowered = [r for r in caplog.records if "payloads are limited" in r.getMessage()]
    assert len(lowered) == 1 and str(limit) in lowered[0].getMessage()
    assert "s3cret-pw" not in caplog.text


def _envelope_head(transport: Transport, topic: str, headers: dict[str, str]) -> int:
    event, body = alkpubsub.Event.create(topic, 1, origin=transport.origin, headers=headers)
    return len(event.envelope(body)) - len(body)


@pytest.mark.parametrize("scheme", ["nats", "nats+durable"])
async def test_event_over_max_payload_with_its_headers_is_refused_and_the_link_stays(
    small_nats: NatsServer, scheme: str
) -> None:
    # Headers that JSON escapes ('"' -> '\"') make the envelope larger than
    # the room kept for it. The envelope is sized to end 10 bytes short of
    # max_payload, so with JetStream's Nats-Msg-Id header (63 bytes) the
    # message is over it. Before: nats-py sent it, nats-server answered
    # "Maximum Payload Violation" and closed the connection, and nats-py gave
    # up on it: the publish, and the transport, ended in ConnectionLost.
    transport: Transport = await alkpubsub.connect(url_for(small_nats, scheme))
    try:
        topic = unique("t")
        headers = {"quote": '"' * 16_000}
        payload = "x" * (SMALL - 10 - _envelope_head(transport, topic, headers) - 2)
        async with transport.subscribe(topic) as sub:
            if scheme == "nats+durable":
                with pytest.raises(PayloadError, match=f"max_payload of {SMALL} bytes"):
                    await transport.publish(topic, payload, headers=headers)
            else:  # no NATS headers: exactly what the server takes
                await transport.publish(topic, payload, headers=headers)
            with pytest.raises(PayloadError, match=f"max_payload of {SMALL} bytes"):
                await transport.publish(topic, payload + "x" * 20, headers=headers)
            after = await transport.publish(topic, "after")
            got = await collect(sub, 2 if scheme == "nats" else 1)
        assert got[-1].id == after.id
    finally:
        await transport.close()


async def test_stream_max_msg_size_lowers_the_limit(nats_server_session: NatsServer) -> None:
    # Before: the stream refused a 20 kB payload with PublishError ("stream refused").
    stream = unique("S")
    nc = await nats.connect(nats_server_session.url)
    try:
        config = StreamConfig(name=stream, subjects=[f"{stream}.>"], max_msg_size=32_768)
        await nc.jetstream().add_stream(config)
    finally:
        await nc.close()
    url = f"{nats_server_session.url.replace('nats://', 'nats+durable://')}?stream={stream}"
    transport = await alkpubsub.connect(url)
    try:
        # Half the message is kept for the head when the full head would take more.
        assert transport.max_payload_bytes == 16_384
        async with transport.subscribe("a") as sub:
            with pytest.raises(PayloadError, match="at most 16384"):
                await transport.publish("a", "x" * 20_000)
            headers = {"quote": '"' * 16_000}
            with pytest.raises(PayloadError, match=f"max_msg_size of stream '{stream}'"):
                await transport.publish("a", "x" * 16_000, headers=headers)
            sent = await transport.publish("a", "x" * 16_382)
            [got] = await collect(sub, 1)
        assert got.id == sent.id
    finally:
        await transport.close()


@pytest.mark.parametrize("scheme", ["nats", "nats+durable"])
async def test_default_server_carries_the_largest_payload_with_the_largest_head(
    nats_server_session: NatsServer, scheme: str
) -> None:
    # 1,000,000 bytes of payload plus a 17.6 kB head and our NATS header fit in
    # nats-server's default max_payload of 1 MiB: nothing is lowered.
    transport = await alkpubsub.connect(url_for(nats_server_session, scheme))
    try:
        assert transport.max_payload_bytes == MAX_PAYLOAD_BYTES
        largest = "x" * (MAX_PAYLOAD_BYTES - 2)
        async with transport.subscribe(LONGEST_TOPIC) as sub:
            key = "k" * MAX_KEY_LENGTH
            sent = await transport.publish(LONGEST_TOPIC, largest, headers=HEADERS, key=key)
            [got] = await collect(sub, 1)
        assert got.id == sent.id and got.payload == largest
    finally:
        await transport.close()
