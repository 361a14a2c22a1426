"""Outbox relay v2: batches, broker outages, crashes, standby takeover, drain, stats.

Real Honker files, and real nats-server / redis-server from tests/brokers.py.
Relays run as ``alkpubsub relay`` subprocesses where a crash is part of the test;
what the broker holds is counted with the raw clients, by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis
from brokers import NatsServer, RedisServer

import alkpubsub
from alkpubsub.abilities import Forwarded
from alkpubsub.conformance import collect, unique
from alkpubsub.errors import PayloadError, PublishError
from alkpubsub.event import Event
from alkpubsub.storage import open_store
from alkpubsub.storage.outbox_relay import OutboxRelay
from alkpubsub.storage.relay_stats import read_stats, stats_path
from alkpubsub.transports.inprocess import InProcessTransport

CLI = str(Path(sys.executable).with_name("alkpubsub"))


# -- helpers -------------------------------------------------------------------


def commit(db: Path, count: int, *, first: int = 0, per_tx: int = 50) -> list[Event]:
    """``count`` events committed in the honker file ``db``, ``per_tx`` a commit."""
    store = open_store(db)
    sent: list[Event] = []
    for start in range(first, first + count, per_tx):
        with store.transaction() as tx:
            for i in range(start, min(start + per_tx, first + count)):
                sent.append(tx.publish(f"orders:{i % 7}", {"i": i}))
    return sent


class Feeder:
    """Commits ``total`` events in the background, ``step`` at a time, so a relay
    is mid-stream whenever the test acts on it."""

    def __init__(self, db: Path, total: int, *, step: int = 20, pause: float = 0.01) -> None:
        self.sent: list[Event] = []
        self.total = total
        self._task = asyncio.create_task(self._feed(db, step, pause))

    async def _feed(self, db: Path, step: int, pause: float) -> None:
        while len(self.sent) < self.total:
            self.sent += await asyncio.to_thread(commit, db, step, first=len(self.sent))
            await asyncio.sleep(pause)

    async def done(self) -> list[Event]:
        await asyncio.wait_for(self._task, 30)
        return self.sent


class Broker:
    """A durable target URL and a raw-client view of what it holds."""

    def __init__(self, kind: str, server: NatsServer | RedisServer) -> None:
        self.kind = kind
        self.server = server
        self.stream = unique("R").upper() if kind == "nats" else unique("relay")

    @property
    def url(self) -> str:
        base = self.server.url
        if self.kind == "nats":
            return base.replace("nats://", "nats+durable://", 1) + f"?stream={self.stream}"
        return base.replace("redis://", "redis+durable://", 1) + f"?stream={self.stream}"

    async def ids(self) -> list[str]:
        """The event ids the broker's stream holds, in stream order (raw client)."""
        if self.kind == "nats":
            return await _nats_ids(self.server.url, self.stream)
        return await _redis_ids(self.server.url, self.stream)

    async def count(self) -> int:
        """How many entries the broker's stream holds (raw client)."""
        if self.kind == "nats":
            nc = await nats.connect(self.server.url)
            try:
                return int((await nc.jetstream().stream_info(self.stream)).state.messages)
            except nats.js.errors.NotFoundError:
                return 0
            finally:
                await nc.close()
        client: Any = aioredis.from_url(self.server.url)
        try:
            return int(await client.xlen(self.stream))
        finally:
            await client.aclose()

    async def wait_for(self, count: int, timeout: float = 15) -> int:
        """Wait until the stream holds at least ``count`` entries; return how many."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                held = await self.count()
            except (OSError, nats.errors.Error):
                held = 0  # the broker is restarting
            if held >= count:
                return held
            assert time.monotonic() < deadline, f"{self.kind} holds {held} of {count}"
            await asyncio.sleep(0.05)


async def _nats_ids(server_url: str, stream: str) -> list[str]:
    nc = await nats.connect(server_url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return []
        ids = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            msg = await js.get_msg(stream, seq)
            ids.append(json.loads(msg.data or b"{}")["id"])
        return ids
    finally:
        await nc.close()


async def _redis_ids(server_url: str, stream: str) -> list[str]:
    client: Any = aioredis.from_url(server_url)
    try:
        entries = await client.xrange(stream)
        return [json.loads(fields[b"event"])["id"] for _, fields in entries]
    finally:
        await client.aclose()


@pytest.fixture(params=["nats", "redis"])
def broker(
    request: pytest.FixtureRequest,
    nats_server_session: NatsServer,
    redis_server_session: RedisServer,
) -> Broker:
    kind: str = request.param
    server = nats_server_session if kind == "nats" else redis_server_session
    return Broker(kind, server)


class RelayProcess:
    """``alkpubsub relay`` as a subprocess, its stdout read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, db: Path, target: str, *args: str) -> RelayProcess:
        proc = await asyncio.create_subprocess_exec(
            CLI,
            "relay",
            "--from",
            f"honker+durable://{db}",
            "--to",
            target,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return cls(proc)

    async def wait_line(self, text: str, timeout: float = 10) -> str:
        """The first line (seen before or next) that contains ``text``."""
        for line in self.lines:
            if text in line:
                return line
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                assert raw, f"relay exited without printing {text!r}: {self.lines}"
                line = raw.decode().rstrip()
                self.lines.append(line)
                if text in line:
                    return line

    async def finish(self, timeout: float = 15) -> int:
        """Wait for the exit; keep the rest of its output."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            rest = await self.proc.stdout.read()
            self.lines += rest.decode().splitlines()
            return await self.proc.wait()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.kill()
            await self.proc.wait()


@contextlib.asynccontextmanager
async def relays() -> AsyncIterator[list[RelayProcess]]:
    """Every relay process started in the block is killed at its end."""
    started: list[RelayProcess] = []
    try:
        yield started
    except BaseException:
        # Show what each relay said (SIGTERM first, so a live one prints its summary).
        for proc in started:
            if proc.proc.returncode is None:
                proc.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(Exception):
                await proc.finish(timeout=5)
            print(f"--- relay pid {proc.proc.pid}:", *proc.lines, sep="\n")
        raise
    finally:
        for proc in started:
            await proc.close()


def assert_each_once(held: Sequence[str], sent: Sequence[Event]) -> None:
    twice = {i: n for i, n in Counter(held).items() if n > 1}
    assert not twice, f"{len(twice)} events reached the broker more than once"
    assert list(held) == [e.id for e in sent], "events missing or out of order"


# -- in process: batching, acks, refusals --------------------------------------


class FlakyTarget(InProcessTransport):
    """An in-process target whose forward fails on chosen calls, and which
    checks that the relay acked nothing of a batch before confirming it."""

    def __init__(self, *, fail_on: set[int], saved: Any) -> None:
        super().__init__()
        self.fail_on = fail_on
        self.saved = saved
        self.calls = 0
        self.batches: list[list[int]] = []
        self.confirmed = 0

    async def forward_batch(self, batch: list[tuple[Event, bytes]]) -> list[Forwarded]:
        self.calls += 1
        # Nothing of this batch (offsets past what was confirmed) is saved yet.
        assert self.saved() <= self.confirmed
        if self.calls in self.fail_on:
            raise PublishError("the broker is away (test)")
        self.batches.append([e.payload["i"] for e, _ in batch])
        done = await super().forward_batch(batch)
        self.confirmed += len(batch)
        return done


async def test_batches_keep_order_and_ack_only_what_the_target_confirmed(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    sent = commit(db, 1000, per_tx=100)
    source = await alkpubsub.connect(f"honker+durable://{db}")
    store = open_store(db)

    def saved() -> int:
        return store.consumer_offsets().get("outbox-relay", 0)

    target = FlakyTarget(fail_on={2, 3}, saved=saved)
    try:
        async with target.subscribe("orders:>", buffer=2000) as sub:
            relay = OutboxRelay(source, target, batch=64, retry_delay=0.01)
            await asyncio.wait_for(relay.run(limit=1000), 20)
            got = await collect(sub, 1000)
        assert [e.id for e in got] == [e.id for e in sent]  # in order, each once
        assert [e.origin for e in got] == [e.origin for e in sent]
        assert all(len(b) <= 64 for b in target.batches)
        assert [i for b in target.batches for i in b] == list(range(1000))
        assert relay.stats.retried == 2
        assert relay.stats.forwarded == 1000
        assert relay.stats.batches == len(target.batches)
        assert relay.stats.last_error is not None and "away" in relay.stats.last_error
        assert saved() == 1000  # closing saved the position
        assert not relay.active
    finally:
        await source.close()
        await target.close()


async def test_a_refused_event_in_a_batch_does_not_block_the_rest(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    source = await alkpubsub.connect(f"honker+durable://{db}?max_deliveries=3")
    target = await alkpubsub.connect(f"memory://{unique('bus')}")
    target.max_payload_bytes = 100
    store = open_store(db)
    with store.transaction() as tx:
        before = [tx.publish("orders:small", {"i": i}) for i in range(5)]
        big = tx.publish("orders:big", "x" * 500)
        after = [tx.publish("orders:small", {"i": i}) for i in range(5, 10)]
    try:
        async with (
            target.subscribe("orders:>") as sub,
            source.subscribe("dead:>", consumer="ops", start="earliest") as dead,
        ):
            relay = OutboxRelay(source, target, pattern="orders:>", retry_delay=0.01)
            stop = asyncio.Event()
            running = asyncio.create_task(relay.run(stop=stop))
            try:
                got = await collect(sub, 10)
                [buried] = await collect(dead, 1)
            finally:
                stop.set()
                await asyncio.wait_for(running, 20)
        assert [e.id for e in got] == [e.id for e in before + after]
        assert buried.topic == "dead:orders:big"
        assert buried.headers["x-original-id"] == big.id
        assert "refused" in buried.headers["x-dead-reason"]
        assert relay.stats.refused == 3  # max_deliveries=3, then dead-lettered
        assert relay.stats.forwarded == 10
    finally:
        await source.close()
        await target.close()


async def test_relay_stats_reach_code_and_the_stats_command(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    commit(db, 300)
    source = await alkpubsub.connect(f"honker+durable://{db}")
    target = await alkpubsub.connect(f"memory://{unique('bus')}")
    relay = OutboxRelay(source, target, stats_interval=0.05)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop=stop))
    try:
        deadline = time.monotonic() + 10
        while not (relay.handled == 300 and relay.stats.lag == 0):
            assert time.monotonic() < deadline, relay.stats
            await asyncio.sleep(0.02)
        assert relay.active
        await asyncio.sleep(0.2)
        [live] = read_stats(db)
        assert live["active"] is True and live["pid"] == os.getpid()
        assert live["forwarded"] == 300 and live["lag"] == 0
        assert stats_path(db, "outbox-relay").exists()
        # Another process (the CLI) sees the consumer and the relay's counters.
        shown = await asyncio.create_subprocess_exec(
            CLI, "stats", "--url", f"honker+durable://{db}", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await shown.communicate()
        text = out.decode()
        assert "consumer=outbox-relay" in text
        assert "relay=outbox-relay  active=True" in text
        assert "forwarded=300" in text and f"pid={os.getpid()}" in text
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)
        await source.close()
        await target.close()
    [done] = read_stats(db)
    assert done["active"] is False and done["forwarded"] == 300


class PickyTarget(InProcessTransport):
    """Refuses a whole batch that holds an event with ``"bad"`` in its payload
    (as a broker that checks sizes per batch would), or hangs when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.hang = False

    async def forward_batch(self, batch: list[tuple[Event, bytes]]) -> list[Forwarded]:
        if self.hang:
            await asyncio.sleep(3600)
        if any("bad" in e.payload for e, _ in batch):
            raise PayloadError("one event of the batch is too large for this broker (test)")
        return await super().forward_batch(batch)


async def test_a_batch_refused_whole_is_split_to_refuse_only_the_bad_event(
    tmp_path: Path,
) -> None:
    db = tmp_path / "app.db"
    source = await alkpubsub.connect(f"honker+durable://{db}?max_deliveries=1")
    target = PickyTarget()
    store = open_store(db)
    with store.transaction() as tx:
        good = [tx.publish("orders:x", {"i": i}) for i in range(20)]
        tx.publish("orders:x", {"bad": True})
        good += [tx.publish("orders:x", {"i": i}) for i in range(20, 40)]
    try:
        async with target.subscribe("orders:>") as sub:
            relay = OutboxRelay(source, target, batch=100)
            await asyncio.wait_for(relay.run(limit=40), 20)
            got = await collect(sub, 40)
        assert [e.id for e in got] == [e.id for e in good]
        assert relay.stats.refused == 1 and relay.stats.retried == 0
    finally:
        await source.close()
        await target.close()


async def test_stop_while_the_target_does_not_answer_returns_after_drain_timeout(
    tmp_path: Path,
) -> None:
    db = tmp_path / "app.db"
    commit(db, 10)
    source = await alkpubsub.connect(f"honker+durable://{db}")
    target = PickyTarget()
    target.hang = True
    relay = OutboxRelay(source, target, drain_timeout=0.3)
    stop = asyncio.Event()
    try:
        running = asyncio.create_task(relay.run(stop=stop))
        await asyncio.sleep(0.3)
        assert relay.active
        stop.set()
        started = time.monotonic()
        await asyncio.wait_for(running, 5)
        assert time.monotonic() - started < 2
        assert relay.handled == 0
        # Nothing was confirmed, so nothing was acked: a later relay sends all 10.
        assert open_store(db).consumer_offsets()["outbox-relay"] == 0
    finally:
        await source.close()
        await target.close()


# -- real brokers --------------------------------------------------------------


async def test_events_the_broker_already_holds_are_counted_as_duplicates_and_acked(
    tmp_path: Path, broker: Broker
) -> None:
    # Two relays under different consumer names forward the same file to one
    # stream: the second one's events are all at the broker already (same ids).
    db = tmp_path / "app.db"
    sent = commit(db, 300)
    source = await alkpubsub.connect(f"honker+durable://{db}")
    target = await alkpubsub.connect(broker.url)
    try:
        first = OutboxRelay(source, target, consumer="first")
        await asyncio.wait_for(first.run(limit=300), 20)
        again = OutboxRelay(source, target, consumer="again")
        await asyncio.wait_for(again.run(limit=300), 20)
        assert (first.stats.forwarded, first.stats.duplicates) == (300, 0)
        assert (again.stats.forwarded, again.stats.duplicates) == (0, 300)
        assert open_store(db).consumer_offsets()["again"] == 300  # acked all the same
        assert_each_once(await broker.ids(), sent)
    finally:
        await source.close()
        await target.close()


@pytest.mark.parametrize("kind", ["nats", "redis"])
async def test_broker_stopped_mid_stream_then_restarted_loses_nothing(
    tmp_path: Path, kind: str, nats_server: NatsServer, redis_server: RedisServer
) -> None:
    server: NatsServer | RedisServer = nats_server if kind == "nats" else redis_server
    target_broker = Broker(kind, server)
    db = tmp_path / "app.db"
    sent = commit(db, 600)
    source = await alkpubsub.connect(f"honker+durable://{db}")
    options = "&publish_timeout=1" if kind == "nats" else "&reconnect_timeout=1"
    target = await alkpubsub.connect(target_broker.url + options)
    relay = OutboxRelay(source, target, batch=32, retry_delay=0.05, max_retry_delay=0.4)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop=stop))
    try:
        await target_broker.wait_for(100)
        await asyncio.to_thread(server.stop)
        more = commit(db, 600, first=600)  # committed while the broker is away
        await asyncio.sleep(2.5)
        assert relay.handled < 1200
        await asyncio.to_thread(server.start)
        await target_broker.wait_for(1200, timeout=20)
        await asyncio.sleep(0.3)
        assert_each_once(await target_broker.ids(), sent + more)
        assert relay.stats.retried > 0
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)
        await source.close()
        await target.close()


async def test_relay_killed_and_restarted_the_broker_holds_each_event_once(
    tmp_path: Path, broker: Broker
) -> None:
    db = tmp_path / "app.db"
    sent = commit(db, 100)
    async with relays() as started:
        first = await RelayProcess.start(db, broker.url, "--batch", "16")
        started.append(first)
        await first.wait_line(": active:")
        feeder = Feeder(db, 3000)
        await broker.wait_for(500)
        first.kill()  # SIGKILL mid-stream: its last acks were never saved
        assert await first.proc.wait() == -signal.SIGKILL
        assert len(feeder.sent) < feeder.total, "killed too late: the stream had ended"
        second = await RelayProcess.start(db, broker.url, "--batch", "16")
        started.append(second)
        await second.wait_line(": active:", timeout=10)
        sent += await feeder.done()
        await broker.wait_for(len(sent))
        await asyncio.sleep(0.5)  # room for a duplicate to land, were it not dropped
        second.proc.send_signal(signal.SIGTERM)
        assert await second.finish() == 0
    assert_each_once(await broker.ids(), sent)
    summary = next(line for line in second.lines if "stopped;" in line)
    print(summary)  # duplicates=N: re-forwarded events the broker dropped by id


async def test_standby_relay_takes_over_when_the_active_one_is_killed(
    tmp_path: Path, broker: Broker
) -> None:
    db = tmp_path / "app.db"
    sent = commit(db, 100)
    async with relays() as started:
        first = await RelayProcess.start(db, broker.url, "--batch", "16")
        started.append(first)
        await first.wait_line(": active:")
        second = await RelayProcess.start(db, broker.url, "--batch", "16")
        started.append(second)
        line = await second.wait_line(": standby:")
        assert "in use by process" in line
        feeder = Feeder(db, 3000)
        await broker.wait_for(500)
        first.kill()
        killed = time.monotonic()
        await first.proc.wait()
        assert len(feeder.sent) < feeder.total, "killed too late: the stream had ended"
        await second.wait_line(": active:", timeout=5)
        assert time.monotonic() - killed < 5
        sent += await feeder.done()
        await broker.wait_for(len(sent))
        await asyncio.sleep(0.5)
        second.proc.send_signal(signal.SIGTERM)
        assert await second.finish() == 0
    assert_each_once(await broker.ids(), sent)


async def test_sigterm_drains_saves_the_position_and_a_restart_forwards_nothing_twice(
    tmp_path: Path, nats_server_session: NatsServer
) -> None:
    target = Broker("nats", nats_server_session)
    db = tmp_path / "app.db"
    sent = commit(db, 100)
    async with relays() as started:
        first = await RelayProcess.start(db, target.url, "--batch", "16")
        started.append(first)
        await first.wait_line(": active:")
        feeder = Feeder(db, 3000)
        await target.wait_for(500)
        first.proc.send_signal(signal.SIGTERM)
        assert await first.finish() == 0
        assert len(feeder.sent) < feeder.total, "stopped too late: the stream had ended"
        summary = next(line for line in first.lines if "stopped;" in line)
        forwarded = int(summary.split("forwarded=")[1].split()[0])
        assert forwarded >= 500
        # Every event it sent was confirmed and acked, and the position saved on the way out.
        assert await target.count() == forwarded
        assert open_store(db).consumer_offsets()["outbox-relay"] == forwarded

        second = await RelayProcess.start(db, target.url)
        started.append(second)
        sent += await feeder.done()
        await target.wait_for(len(sent))
        await asyncio.sleep(0.3)
        second.proc.send_signal(signal.SIGTERM)
        assert await second.finish() == 0
    rest = next(line for line in second.lines if "stopped;" in line)
    assert "duplicates=0" in rest
    assert f"forwarded={len(sent) - forwarded}" in rest
    assert_each_once(await target.ids(), sent)
