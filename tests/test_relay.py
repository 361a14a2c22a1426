"""The outbox relay carries committed Honker events to a broker, each once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats

import alkpubsub
from alkpubsub.conformance import collect, unique
from alkpubsub.storage import open_store
from alkpubsub.storage.outbox_relay import OutboxRelay


async def stream_messages(server_url: str, stream: str) -> int:
    """How many messages the JetStream stream holds, asked with the raw client."""
    nc = await nats.connect(server_url)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.messages)
    finally:
        await nc.close()


def durable_url(server_url: str, stream: str) -> str:
    return server_url.replace("nats://", "nats+durable://", 1) + f"?stream={stream}"


def relay_process(db: Path, target: str) -> subprocess.Popen[bytes]:
    cli = Path(sys.executable).with_name("alkpubsub")
    return subprocess.Popen(
        [str(cli), "relay", "--from", f"honker+durable://{db}", "--to", target],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_relay_forwards_committed_events_with_ids_and_origin(
    tmp_path: Path, nats_server_session: object
) -> None:
    stream = unique("R").upper()
    target_url = durable_url(nats_server_session.url, stream)  # type: ignore[attr-defined]
    store = open_store(tmp_path / "app.db")
    with store.transaction() as tx:
        sent = [tx.publish(f"orders:{i}", {"i": i}) for i in range(20)]
    source = await alkpubsub.connect(f"honker+durable://{tmp_path / 'app.db'}")
    target = await alkpubsub.connect(target_url)
    async with target.subscribe("orders:*", consumer="node2", start="earliest") as sub:
        relay = OutboxRelay(source, target)
        await asyncio.wait_for(relay.run(limit=20), 30)
        got = await collect(sub, 20)
        for event in got:
            await sub.ack(event)
    assert [(e.id, e.origin, e.payload) for e in got] == [(e.id, e.origin, e.payload) for e in sent]
    await source.close()
    await target.close()
    store.close()


async def test_relay_killed_mid_stream_resumes_without_duplicates(
    tmp_path: Path, nats_server_session: object
) -> None:
    # 300 events; the relay process is SIGKILLed after some are forwarded and
    # restarted. It forwards again whatever it had not acked at the source;
    # JetStream drops those by Nats-Msg-Id, so the stream holds exactly 300.
    server_url = nats_server_session.url  # type: ignore[attr-defined]
    stream = unique("R").upper()
    target = durable_url(server_url, stream)
    db = tmp_path / "app.db"
    store = open_store(db)
    for start in range(0, 300, 10):
        with store.transaction() as tx:
            for i in range(start, start + 10):
                tx.publish(f"orders:{i}", {"i": i})

    first = relay_process(db, target)
    deadline = time.monotonic() + 30
    while True:
        try:
            if await stream_messages(server_url, stream) >= 50:
                break
        except nats.js.errors.NotFoundError:
            pass
        assert time.monotonic() < deadline, "the relay forwarded nothing"
        await asyncio.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()

    second = relay_process(db, target)
    deadline = time.monotonic() + 30
    while await stream_messages(server_url, stream) < 300:
        assert time.monotonic() < deadline, "the restarted relay did not catch up"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # room for any duplicate to land, if it were not dropped
    second.send_signal(signal.SIGTERM)
    second.wait()
    assert await stream_messages(server_url, stream) == 300
    store.close()


async def test_an_event_the_target_can_never_take_does_not_hold_back_the_rest(
    tmp_path: Path,
) -> None:
    # The target accepts at most 100 bytes of payload: the 500-byte event can
    # never go there. Retrying it forever (as the relay once did) would stall
    # every later event; it is refused and dead-lettered at the source instead.
    db = tmp_path / "app.db"
    source = await alkpubsub.connect(f"honker+durable://{db}?max_deliveries=2")
    target = await alkpubsub.connect(f"memory://{unique('bus')}")
    target.max_payload_bytes = 100
    await source.publish("orders:big", "x" * 500)
    after = await source.publish("orders:small", "ok")
    try:
        async with (
            target.subscribe("orders:>") as sub,
            source.subscribe("dead:>", consumer="ops", start="earliest") as dead,
        ):
            relay = OutboxRelay(source, target, pattern="orders:>", retry_delay=0.01)
            stop = asyncio.Event()
            running = asyncio.create_task(relay.run(stop=stop))
            try:
                [got] = await collect(sub, 1)
                assert got.id == after.id
                [buried] = await collect(dead, 1)
            finally:
                stop.set()
                await asyncio.wait_for(running, 30)
            assert buried.payload == "x" * 500
            assert buried.headers["x-original-topic"] == "orders:big"
            assert relay.stats.refused == 2  # max_deliveries=2, then dead-lettered
    finally:
        await source.close()
        await target.close()
