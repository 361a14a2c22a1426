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


async def test_a_second_relay_stands_by_and_takes_over_when_the_first_stops(
    tmp_path: Path,
) -> None:
    # Same file, same consumer name: the source's consumer lease lets one relay
    # forward; the other stands by (relay.active is False) and takes over once
    # the first stops, continuing after the first one's saved position.
    db = tmp_path / "app.db"
    store = open_store(db)
    with store.transaction() as tx:
        first_half = [tx.publish(f"orders:{i}", {"i": i}) for i in range(50)]
    source = await alkpubsub.connect(f"honker+durable://{db}")
    target = await alkpubsub.connect(f"memory://{unique('bus')}")
    states: list[tuple[str, bool, str]] = []
    standing_by = asyncio.Event()

    def two_said(active: bool, detail: str) -> None:
        states.append(("two", active, detail))
        if detail.startswith("standby"):
            standing_by.set()

    try:
        async with target.subscribe("orders:>", buffer=1000) as sub:
            one = OutboxRelay(source, target, on_state=lambda a, d: states.append(("one", a, d)))
            two = OutboxRelay(source, target, standby_poll=0.05, on_state=two_said)
            stop_one, stop_two = asyncio.Event(), asyncio.Event()
            running_one = asyncio.create_task(one.run(stop=stop_one))
            got = await collect(sub, 50)
            assert one.active
            running_two = asyncio.create_task(two.run(stop=stop_two))
            await asyncio.wait_for(standing_by.wait(), 10)
            assert not two.active
            stop_one.set()
            await asyncio.wait_for(running_one, 10)
            with store.transaction() as tx:
                second_half = [tx.publish(f"orders:{i}", {"i": i}) for i in range(50, 80)]
            got += await collect(sub, 30)
            assert two.active
            stop_two.set()
            await asyncio.wait_for(running_two, 10)
        assert [e.id for e in got] == [e.id for e in first_half + second_half]
        assert (one.stats.forwarded, two.stats.forwarded) == (50, 30)
        said = [(a, d.split(":")[0]) for who, a, d in states if who == "two"]
        assert said == [(False, "standby"), (True, "active"), (False, "inactive")]
    finally:
        await source.close()
        await target.close()


def test_relay_command_prints_redacted_urls_and_a_summary(
    tmp_path: Path, nats_server_session: object
) -> None:
    db = tmp_path / "app.db"
    store = open_store(db)
    with store.transaction() as tx:
        for i in range(30):
            tx.publish(f"orders:{i}", {"i": i})
    server_url: str = nats_server_session.url  # type: ignore[attr-defined]
    # The test server has no authentication; it ignores the credentials, and the
    # relay must never print them.
    target = durable_url(server_url, unique("R").upper()).replace(
        "nats+durable://", "nats+durable://ops:s3cr3t-pw@", 1
    )
    cli = Path(sys.executable).with_name("alkpubsub")
    args = ["relay", "--from", f"honker+durable://{db}", "--to", target, "--count", "30"]
    done = subprocess.run(
        [str(cli), *args, "--batch", "8"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "s3cr3t" not in out
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"relay outbox-relay: honker+durable://{db} -> nats+durable://")
    assert "***" in lines[0]
    assert any(": active:" in line for line in lines)
    assert "forwarded=30 duplicates=0 refused=0 retried=0" in lines[-1]
    stats = subprocess.run(
        [str(cli), "stats", "--url", f"honker+durable://{db}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "consumer=outbox-relay  offset=30  lag=0" in stats.stdout
    assert "relay=outbox-relay  active=False" in stats.stdout
    assert "forwarded=30" in stats.stdout
    assert "s3cr3t" not in stats.stdout
