"""Hostile review of the composite transport (composite v2, commit 848f1de).

Each test attacks one promise of the composite: publish persists to the
targets first, then delivers locally; a required target that fails means no
local delivery; each subscriber gets each event exactly once; optional targets
are counted and logged; publish returns the durable offset; nothing hangs,
leaks tasks or shows a secret. Tests that fail reveal a defect (see each
docstring); tests that pass held the guarantee under the attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from brokers import NatsServer, RedisServer

import alkpubsub
from alkpubsub import Event, PublishError, Settings
from alkpubsub.composite import RECENT_IDS, CompositeTransport
from alkpubsub.conformance import OtherProcess, collect, nothing_more, unique
from alkpubsub.transports.inprocess import InProcessTransport

pytestmark = pytest.mark.timeout(30)


def _foreign_events(count: int, topic: str = "a:b", origin: str = "elsewhere") -> list[Event]:
    """Events published by some other instance (another origin), to forward."""
    return [Event.create(topic, i, origin=origin)[0] for i in range(count)]


async def _drain(sub: alkpubsub.Subscription, quiet: float = 0.5) -> list[Event]:
    """Everything ``sub`` yields until it is quiet for ``quiet`` seconds."""
    got: list[Event] = []
    while True:
        try:
            got.append(await sub.get(timeout=quiet))
        except TimeoutError:
            return got


class _SlowTarget(InProcessTransport):
    """A shared-bus target that takes each write after a pause. The write is
    handed off (as Honker's writer thread or a broker's socket takes it), so
    cancelling the publisher does not undo it."""

    def __init__(self, name: str, pause: float) -> None:
        super().__init__(name)
        self.pause = pause
        self.stored: list[str] = []
        self._writes: set[asyncio.Task[Event]] = set()

    async def send(self, event: Event, body: bytes) -> Event:
        task = asyncio.ensure_future(self._write(event, body))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    async def _write(self, event: Event, body: bytes) -> Event:
        await asyncio.sleep(self.pause)
        stored = await InProcessTransport.send(self, event, body)
        self.stored.append(event.id)
        return stored


# -- dedupe window ---------------------------------------------------------------


async def test_forward_many_beyond_the_dedupe_window_delivers_no_event_twice(
    tmp_path: Path,
) -> None:
    """forward_many of more than RECENT_IDS events of another origin (what an
    outbox relay does into a composite): each event must reach the subscriber once."""
    composite = await alkpubsub.connect(["memory://", f"honker://{tmp_path / 'e.db'}"])
    count = RECENT_IDS + 500
    async with composite.subscribe("a:b", buffer=4 * count) as sub:
        events = _foreign_events(count)
        await composite.forward_many(events)
        got = await _drain(sub)
    await composite.close()
    ids = [e.id for e in got]
    assert len(ids) == len(set(ids)) == count, (
        f"{len(ids)} deliveries for {count} events, {len(ids) - len(set(ids))} duplicates"
    )


async def test_two_targets_reaching_another_node_beyond_the_window_deliver_once(
    tmp_path: Path,
) -> None:
    """Another composite on the same two targets publishes more than RECENT_IDS
    events in one batch: one target delivers them all before the other does."""
    shared = f"memory://{unique('shared')}"
    urls = ["memory://", f"honker://{tmp_path / 'e.db'}", shared]
    here = await alkpubsub.connect(urls)
    there = await alkpubsub.connect(urls)
    count = RECENT_IDS + 500
    async with here.subscribe("a:b", buffer=4 * count) as sub:
        sent = await there.publish_many([("a:b", i) for i in range(count)])
        got = await _drain(sub)
    await here.close()
    await there.close()
    ids = [e.id for e in got]
    assert {e.id for e in sent} == set(ids)
    assert len(ids) == count, f"{len(ids) - count} duplicate deliveries"


async def test_another_process_beyond_the_window_while_one_target_lags(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """Another process's composite on [honker+durable file, nats] publishes
    more than RECENT_IDS events while the NATS server is stalled (SIGSTOP):
    they all arrive through the file first, then the NATS copies arrive when
    it resumes. Each must still be delivered once."""
    urls = [
        "memory://",
        f"honker+durable://{tmp_path / 'e.db'}",
        f"{nats_server.url}?prefix={unique('alk')}",
    ]
    count = RECENT_IDS + 300
    here = await alkpubsub.connect(urls)
    child = await OtherProcess(urls).start("a:b", count)
    async with here.subscribe("a:b", buffer=4 * count) as sub:
        assert nats_server.pid is not None
        os.kill(nats_server.pid, signal.SIGSTOP)
        try:
            child.go()
            first = await collect(sub, count, timeout=20)  # through the file
        finally:
            os.kill(nats_server.pid, signal.SIGCONT)
        ids = await child.ids()
        late = await _drain(sub, 1.5)
    await here.close()
    assert sorted(e.id for e in first) == sorted(ids)
    assert not late, f"{len(late)} events delivered a second time, through NATS"


async def test_two_targets_within_the_window_deliver_once(tmp_path: Path) -> None:
    """Held: below the window the same remote event from two targets is delivered once."""
    shared = f"memory://{unique('shared')}"
    urls = ["memory://", f"honker://{tmp_path / 'e.db'}", shared]
    here = await alkpubsub.connect(urls)
    there = await alkpubsub.connect(urls)
    async with here.subscribe("a:b", buffer=10_000) as sub:
        sent = await there.publish_many([("a:b", i) for i in range(1000)])
        sent += [await there.publish("a:b", i) for i in range(100)]
        got = await _drain(sub)
    await here.close()
    await there.close()
    assert [e.id for e in got] == [e.id for e in sent]


# -- cancellation and timeouts: the durable target and the live subscriber disagree --


async def test_cancelled_publish_that_the_target_stored_is_not_lost_locally() -> None:
    """publish cancelled (wait_for) after the target took the write: the target
    keeps it, so the other nodes get it; the local subscriber must get it too
    (or the target must not have it). Echoes of our origin are dropped, so the
    local subscriber can only get it from the local leg."""
    bus = unique("bus")
    target = _SlowTarget(bus, pause=0.05)
    composite = CompositeTransport(InProcessTransport(), target)
    other = await alkpubsub.connect(["memory://", f"memory://{bus}"])
    async with composite.subscribe("a:b") as local, other.subscribe("a:b") as remote:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(composite.publish("a:b", "cancelled"), 0.01)
        await asyncio.sleep(0.2)
        elsewhere = await _drain(remote, 0.3)
        here = await _drain(local, 0.3)
    await composite.close()
    await other.close()
    assert len(target.stored) == 1 and [e.id for e in elsewhere] == target.stored
    assert [e.id for e in here] == target.stored, "stored and seen elsewhere, lost locally"


async def test_cancelled_publish_on_honker_durable_is_seen_by_durable_and_live_alike(
    tmp_path: Path,
) -> None:
    """The same with a real honker+durable target: the cancelled append commits
    in the writer thread; the durable consumer gets the event, the composite's
    own live subscriber never does."""
    composite = await alkpubsub.connect(["memory://", f"honker+durable://{tmp_path / 'e.db'}"])
    async with (
        composite.subscribe("a:b") as live,
        composite.subscribe("a:b", consumer="c", start="earliest") as durable,
    ):
        cancelled = 0
        for i in range(300):  # some are cancelled after the append was queued
            try:
                await asyncio.wait_for(composite.publish("a:b", i), 0.00005)
            except TimeoutError:
                cancelled += 1
                if cancelled >= 3:
                    break
        stored = await _drain(durable, 0.5)
        seen = await _drain(live, 0.3)
    await composite.close()
    assert cancelled, "no publish was cancelled: the attack did not happen"
    assert [e.payload for e in seen] == [e.payload for e in stored]


_LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
conn.close()
"""


def _lock_file(path: Path, seconds: float) -> subprocess.Popen[str]:
    """A child process holding the SQLite write lock on ``path`` for ``seconds``."""
    child = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "locked"
    return child


async def test_timed_out_honker_write_that_commits_later_reaches_the_live_subscriber(
    tmp_path: Path,
) -> None:
    """composite_timeout on the durable honker target while another process
    holds the write lock: the publish fails with PublishError (not delivered
    locally), but the queued append commits once the lock is released. The
    durable consumer then has an event the live subscriber never gets (its
    echo is dropped by origin), and PublishError carries no event to retry
    with the same id."""
    path = tmp_path / "e.db"
    composite = await alkpubsub.connect(
        ["memory://", f"honker+durable://{path}?composite_timeout=0.3"]
    )
    async with (
        composite.subscribe("a:b") as live,
        composite.subscribe("a:b", consumer="c", start="earliest") as durable,
    ):
        await composite.publish("a:b", "warm")  # the file exists, the writer is up
        child = _lock_file(path, 1.0)
        try:
            started = time.monotonic()
            with pytest.raises(PublishError) as info:
                await composite.publish("a:b", "while locked")
            assert time.monotonic() - started < 2, "composite_timeout was not applied"
        finally:
            await asyncio.to_thread(child.wait, 10)
        stored = await _drain(durable, 1.0)
        seen = await _drain(live, 0.3)
    await composite.close()
    assert "composite_timeout=0.3" in str(info.value)
    assert [e.payload for e in seen] == [e.payload for e in stored], (
        f"durable consumer got {[e.payload for e in stored]}, live got {[e.payload for e in seen]}"
    )


async def test_publish_after_a_timed_out_honker_write_does_not_hang(tmp_path: Path) -> None:
    """Held: once the lock is gone, the next publish goes through promptly, and
    the write that timed out, committed late, reaches the live subscriber too."""
    path = tmp_path / "e.db"
    composite = await alkpubsub.connect(
        ["memory://", f"honker+durable://{path}?composite_timeout=0.3"]
    )
    async with composite.subscribe("a:b") as live:
        await composite.publish("a:b", "warm")
        child = _lock_file(path, 0.8)
        try:
            with pytest.raises(PublishError):
                await composite.publish("a:b", "while locked")
        finally:
            await asyncio.to_thread(child.wait, 10)
        started = time.monotonic()
        after = await composite.publish("a:b", "after")
        assert time.monotonic() - started < 1
        assert after.offset is not None
        got = await _drain(live, 0.5)
    await composite.close()
    assert [e.payload for e in got] == ["warm", "while locked", "after"]


@pytest.mark.parametrize("spelling", ["0.0", "0.00", "0e0"])
async def test_composite_timeout_zero_spelled_as_a_float_means_no_limit(
    tmp_path: Path, spelling: str
) -> None:
    """The docs: composite_timeout 0 = no limit. "0.0" is 0 too, but only the
    exact text "0" is read as no limit: "0.0" becomes a 0 s deadline."""
    url = f"honker+durable://{tmp_path / 'e.db'}?composite_timeout={spelling}"
    composite = await alkpubsub.connect(["memory://", url])
    try:
        sent = await composite.publish("a:b", 1)
        assert sent.offset is not None
        assert composite.leg_stats[0].timeout is None
    finally:
        await composite.close()


async def test_settings_composite_timeout_zero_means_no_limit(tmp_path: Path) -> None:
    """Held: Settings.composite_timeout=0 is no limit."""
    settings = Settings.load(
        url=["memory://", f"honker+durable://{tmp_path / 'e.db'}"], composite_timeout=0
    )
    composite = await alkpubsub.connect(settings)
    assert composite.leg_stats[0].timeout is None
    assert (await composite.publish("a:b", 1)).offset is not None
    await composite.close()


# -- origins: the echo filter must only drop what this composite published --


async def test_tx_publish_on_the_composites_own_honker_leg_reaches_its_subscriber(
    tmp_path: Path,
) -> None:
    """Held with default settings: ``tx.publish`` through the durable leg's
    store (another origin) reaches the composite's live subscriber once."""
    composite = await alkpubsub.connect(["memory://", f"honker+durable://{tmp_path / 'e.db'}"])
    store = composite.targets[0].store  # type: ignore[attr-defined]
    async with composite.subscribe("a:b") as sub:
        with store.transaction() as tx:
            tx.publish("a:b", "in a transaction")
        sent = await composite.publish("a:b", "published")
        got = await _drain(sub)
    await composite.close()
    assert sorted(e.payload for e in got) == ["in a transaction", "published"]
    assert len({e.id for e in got}) == 2 and sent.id in {e.id for e in got}


async def test_tx_publish_reaches_the_subscriber_when_settings_set_an_origin(
    tmp_path: Path,
) -> None:
    """With ``Settings.origin`` set (ALKPUBSUB_ORIGIN), open_composite gives the
    composite *and* every leg that origin, so the durable leg's store stamps
    tx.publish events with the composite's own origin and they are dropped as
    echoes: committed, seen by durable consumers, never by a live subscriber."""
    settings = Settings.load(
        url=["memory://", f"honker+durable://{tmp_path / 'e.db'}"], origin="orders-node"
    )
    composite = await alkpubsub.connect(settings)
    store = composite.targets[0].store  # type: ignore[attr-defined]
    async with composite.subscribe("a:b") as sub:
        with store.transaction() as tx:
            tx.publish("a:b", "in a transaction")
        got = await _drain(sub)
    await composite.close()
    assert [e.payload for e in got] == ["in a transaction"]


async def test_two_composites_on_one_file_in_one_process_see_each_other(tmp_path: Path) -> None:
    """Held with default settings: two composites on one file, in one process."""
    urls = ["memory://", f"honker+durable://{tmp_path / 'e.db'}"]
    one = await alkpubsub.connect(urls)
    two = await alkpubsub.connect(urls)
    async with one.subscribe("a:b") as sub_one, two.subscribe("a:b") as sub_two:
        a = await one.publish("a:b", "one")
        b = await two.publish("a:b", "two")
        many = await two.publish_many([("a:b", i) for i in range(50)])
        got_one = await _drain(sub_one)
        got_two = await _drain(sub_two)
    await one.close()
    await two.close()
    expected = sorted([a.id, b.id, *(e.id for e in many)])
    assert sorted(e.id for e in got_one) == expected
    assert sorted(e.id for e in got_two) == expected


async def test_overflow_from_a_durable_leg_drops_oldest_and_counts_it(tmp_path: Path) -> None:
    """Held: a slow reader of a composite fed by a honker+durable leg (put(),
    which would pause without a sink) keeps the last ``buffer`` events to
    arrive and counts the rest in stats.dropped; the publisher is not blocked.
    (Arrival order: local events published after a remote batch may be the
    ones dropped, when the durable leg delivers that batch after them.)"""
    urls = ["memory://", f"honker+durable://{tmp_path / 'e.db'}"]
    here = await alkpubsub.connect(urls)
    there = await alkpubsub.connect(urls)
    async with here.subscribe("a:b", buffer=10) as sub:
        started = time.monotonic()
        sent = await there.publish_many([("a:b", i) for i in range(200)])
        sent += [await here.publish("a:b", 200 + i) for i in range(5)]
        assert time.monotonic() - started < 3
        await asyncio.sleep(0.5)
        got = await _drain(sub, 0.3)
        stats = sub.stats
    await here.close()
    await there.close()
    assert len(got) == 10 and len({e.id for e in got}) == 10
    assert {e.id for e in got} <= {e.id for e in sent}
    assert stats.dropped == len(sent) - 10
    assert stats.delivered == 10


async def test_publish_many_with_one_bad_item_publishes_nothing(tmp_path: Path) -> None:
    """Held: one unserialisable item refuses the whole batch on every leg."""
    composite = await alkpubsub.connect(["memory://", f"honker+durable://{tmp_path / 'e.db'}"])
    async with (
        composite.subscribe("a:b") as live,
        composite.subscribe("a:b", consumer="c", start="earliest") as durable,
    ):
        with pytest.raises(alkpubsub.PayloadError):
            await composite.publish_many([("a:b", 1), ("a:b", {"bad": object()}), ("a:b", 3)])
        with pytest.raises(alkpubsub.InvalidTopic):
            await composite.publish_many([("a:b", 1), ("a:*", 2)])
        await nothing_more(live)
        await nothing_more(durable)
    assert composite.leg_stats[0].accepted == 0
    await composite.close()


# -- concurrency, closing, leaks --


async def test_many_publishers_while_subscriptions_open_and_close(tmp_path: Path) -> None:
    """Held: 20 tasks x 25 publishes while other subscriptions open and close:
    the steady subscriber gets each event once, in each task's order, and
    closing leaves no task behind."""
    before = set(asyncio.all_tasks())
    composite = await alkpubsub.connect(["memory://", f"honker+durable://{tmp_path / 'e.db'}"])
    churned: list[int] = []

    async def publisher(n: int) -> list[Event]:
        out = []
        for i in range(25):
            out.append(await composite.publish("a:b", [n, i]))
            if i % 5 == 0:
                out += await composite.publish_many([("a:b", [n, 100 + i])])
        return out

    async def churn() -> None:
        for _ in range(15):
            async with composite.subscribe("a:*") as s:
                await asyncio.sleep(0.01)
                churned.append(s.buffered)

    async with composite.subscribe("a:b", buffer=10_000) as sub:
        results = await asyncio.gather(*(publisher(n) for n in range(20)), churn())
        sent = [e for r in results[:-1] for e in r]  # type: ignore[union-attr]
        got = await collect(sub, len(sent))
        await nothing_more(sub)
    assert sorted(e.id for e in got) == sorted(e.id for e in sent)
    for n in range(20):
        mine = [e.payload for e in got if e.payload[0] == n]
        assert mine == sorted(mine, key=lambda p: (p[1] % 100, p[1] >= 100))
    await composite.close()
    await asyncio.sleep(0.1)
    leftover = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]
    assert not leftover, leftover


async def test_closing_while_a_leg_is_delivering_is_clean(tmp_path: Path) -> None:
    """Held: a subscription closed while another composite floods the honker
    leg raises nothing, stops delivering, and its legs are closed."""
    urls = ["memory://", f"honker+durable://{tmp_path / 'e.db'}"]
    here = await alkpubsub.connect(urls)
    there = await alkpubsub.connect(urls)
    sub = here.subscribe("a:b")
    await sub.start()
    flood = asyncio.create_task(there.publish_many([("a:b", i) for i in range(3000)]))
    first = await sub.get(timeout=5)
    await sub.close()
    await flood
    assert first.payload == 0
    assert all(leg.closed for leg in sub.legs)  # type: ignore[attr-defined]
    with pytest.raises(StopAsyncIteration):
        await sub.__anext__()
    await here.close()
    await there.close()


async def test_a_subscription_cancelled_while_starting_closes_its_legs(tmp_path: Path) -> None:
    """Held: cancelling ``start`` (e.g. a caller's timeout) leaves no leg live."""
    composite = await alkpubsub.connect(["memory://", f"honker+durable://{tmp_path / 'e.db'}"])
    local = composite.local
    for delay in (0, 0.0005, 0.002):
        sub = composite.subscribe("a:b")
        task = asyncio.create_task(sub.start())
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not sub.closed:
            await sub.close()
    await asyncio.sleep(0.05)
    assert not local._subscriptions  # type: ignore[attr-defined]
    assert not composite.targets[0]._subscriptions  # type: ignore[attr-defined]
    await composite.close()


class _BreakableTarget(InProcessTransport):
    """A shared-bus target whose subscriptions can be broken from the test."""


async def test_a_target_leg_that_fails_mid_stream_raises_on_the_composite() -> None:
    """Held: a target leg that fails makes the composite's iterator raise (after
    what was buffered), rather than silently going deaf."""
    bus = unique("bus")
    composite = CompositeTransport(InProcessTransport(), _BreakableTarget(bus))
    async with composite.subscribe("a:b") as sub:
        await composite.publish("a:b", 1)
        [target_leg] = [leg for leg in sub.legs if leg.transport is composite.targets[0]]  # type: ignore[attr-defined]
        target_leg.fail(alkpubsub.ConnectionLost("broker gone for good"))
        assert (await sub.get(timeout=1)).payload == 1
        with pytest.raises(alkpubsub.ConnectionLost):
            await sub.get(timeout=1)
    await composite.close()


async def test_publish_to_a_closed_required_target_fails() -> None:
    """A required target closed underneath the composite: ``_send`` calls the
    leg's ``send`` hook directly, past its ``check_open``, so the publish
    "succeeds" on a closed target and is delivered locally as if persisted."""
    composite = CompositeTransport(InProcessTransport(), InProcessTransport(unique("bus")))
    async with composite.subscribe("a:b") as sub:
        await composite.targets[0].close()
        with pytest.raises(alkpubsub.PubSubError):
            await composite.publish("a:b", "after the target closed")
        await nothing_more(sub)
    await composite.close()


# -- real brokers: an optional target that hangs, gives up, or carries a password --


async def test_an_optional_target_that_gives_up_does_not_break_the_subscription(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """An optional redis target down for longer than its reconnect_timeout:
    its leg fails and finishes. The composite passes that failure to the
    application's iterator (for a target the configuration says is optional),
    and never subscribes to it again once the broker is back, unlike a target
    that is down when the subscription starts (retried every 1 s)."""
    honker = f"honker+durable://{tmp_path / 'e.db'}"
    optional = f"{redis_server.url}?composite_required=false&reconnect_timeout=0.5"
    composite = await alkpubsub.connect(["memory://", honker, optional])
    async with composite.subscribe("a:b") as sub:
        redis_server.stop()
        await asyncio.sleep(2.0)  # the redis leg gives up
        sent = await composite.publish("a:b", "local, redis down")
        try:
            got = await sub.get(timeout=1)
        except alkpubsub.ConnectionLost as exc:
            pytest.fail(f"optional target's failure surfaced on the subscription: {exc}")
        assert got.id == sent.id
        redis_server.start()
        other_node = await alkpubsub.connect(redis_server.url)
        deadline = time.monotonic() + 6
        remote: list[Event] = []
        while not remote and time.monotonic() < deadline:
            await other_node.publish("a:b", "from another node")
            try:
                remote = [await sub.get(timeout=0.5)]
            except TimeoutError:
                continue
        await other_node.close()
    await composite.close()
    assert remote, "the optional target never rejoined the subscription"


async def test_an_optional_target_that_hangs_times_out_and_recovers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Held: an optional redis target SIGSTOPped while the required honker
    target works: each publish returns within the optional timeout, is
    delivered locally once, counted as timed out; after SIGCONT the target
    accepts again and the late copies it stored are not delivered twice."""
    honker = f"honker+durable://{tmp_path / 'e.db'}"
    optional = f"{redis_server.url}?composite_required=false&composite_timeout=0.3"
    composite = await alkpubsub.connect(["memory://", honker, optional])
    async with composite.subscribe("a:b") as sub:
        await composite.publish("a:b", "before")
        assert redis_server.pid is not None
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            for i in range(3):
                started = time.monotonic()
                sent = await composite.publish("a:b", f"hung {i}")
                assert time.monotonic() - started < 1.5
                assert sent.offset is not None
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        await asyncio.sleep(0.5)
        after = [await composite.publish("a:b", f"after {i}") for i in range(3)]
        got = await _drain(sub, 1.0)
    _, redis_leg = composite.leg_stats
    await composite.close()
    assert [e.payload for e in got] == ["before", "hung 0", "hung 1", "hung 2"] + [
        e.payload for e in after
    ]
    assert redis_leg.timed_out == 3 and redis_leg.failed == 3
    assert redis_leg.accepted == 4


SECRET = "Pw-s3cr3t-7"


async def test_no_password_in_errors_logs_or_reprs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Held: a redis target with a password and composite options: down,
    optional, required, hung or with a wrong password, the password shows up
    in no error, log line, name, repr or leg_stats."""
    caplog.set_level(logging.DEBUG)
    server = RedisServer(password=SECRET, base_dir=tmp_path / "redis")
    server.start()
    texts: list[str] = []
    try:
        honker = f"honker+durable://{tmp_path / 'e.db'}"
        optional = f"{server.url}?composite_required=false&composite_timeout=0.3"
        required = f"{server.url}?composite_timeout=0.3"
        composite = await alkpubsub.connect(["memory://", honker, optional])
        texts += [repr(composite), composite.name, str(composite.leg_stats)]
        async with composite.subscribe("a:b") as sub:
            texts.append(repr(sub))
            texts += [repr(leg) for leg in sub.legs]  # type: ignore[attr-defined]
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            try:
                await composite.publish("a:b", 1)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            server.stop()
            await composite.publish("a:b", 2)
            texts.append(str(composite.leg_stats))
        await composite.close()
        server.start()
        strict = await alkpubsub.connect(["memory://", honker, required])
        server.stop()
        with pytest.raises(PublishError) as info:
            await strict.publish("a:b", 3)
        texts += [str(info.value), repr(info.value), str(info.value.__cause__)]
        texts += [str(strict.leg_stats)]
        await strict.close()
        server.start()
        wrong = server.url.replace(SECRET, SECRET + "x")
        with pytest.raises(alkpubsub.PubSubError) as bad:
            await alkpubsub.connect(["memory://", f"{wrong}?composite_timeout=1"])
        texts += [str(bad.value), repr(bad.value)]
        with pytest.raises(alkpubsub.ConfigError) as bad_option:
            await alkpubsub.connect(["memory://", f"{server.url}?composite_required=perhaps"])
        texts.append(str(bad_option.value))
    finally:
        server.close()
    texts += [r.getMessage() for r in caplog.records]
    texts += [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    leaks = [t for t in texts if SECRET in t]
    assert not leaks, leaks


async def test_no_token_in_errors_for_an_unreachable_nats_target(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Held: a NATS target with a token in its URL and composite options that
    cannot be reached: the error and logs do not show the token."""
    from brokers import free_port

    caplog.set_level(logging.DEBUG)
    url = f"nats://{SECRET}@127.0.0.1:{free_port()}?composite_timeout=0.5&connect_timeout=0.5"
    with pytest.raises(alkpubsub.PubSubError) as info:
        await alkpubsub.connect(["memory://", f"honker+durable://{tmp_path / 'e.db'}", url])
    texts = [str(info.value), repr(info.value), str(info.value.__cause__)]
    texts += [r.getMessage() for r in caplog.records]
    assert not [t for t in texts if SECRET in t]


async def test_closing_with_an_optional_target_being_retried_leaves_no_task(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Held: a subscription retrying an optional target that is down, closed
    (directly, or by closing the composite): its retry task is gone."""
    before = set(asyncio.all_tasks())
    honker = f"honker+durable://{tmp_path / 'e.db'}"
    optional = f"{redis_server.url}?composite_required=false"
    composite = await alkpubsub.connect(["memory://", honker, optional])
    redis_server.stop()
    sub = composite.subscribe("a:b")
    await sub.start()
    assert sub._tasks  # type: ignore[attr-defined]
    other = composite.subscribe("a:*")
    await other.start()
    await sub.close()
    await composite.close()
    assert other.closed
    await asyncio.sleep(0.05)
    leftover = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]
    assert not leftover, leftover


async def test_a_required_target_down_at_subscribe_closes_the_local_leg(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Held: a required target that cannot be subscribed to fails the
    subscription, and the legs already opened are closed again."""
    honker = f"honker+durable://{tmp_path / 'e.db'}"
    composite = await alkpubsub.connect(["memory://", honker, redis_server.url])
    redis_server.stop()
    sub = composite.subscribe("a:b")
    with pytest.raises(alkpubsub.PubSubError):
        await sub.start()
    assert sub.closed
    assert not composite.local._subscriptions  # type: ignore[attr-defined]
    assert not composite.targets[0]._subscriptions  # type: ignore[attr-defined]
    await composite.close()


async def test_publish_returns_the_offset_of_a_durable_target_that_is_not_first(
    tmp_path: Path,
) -> None:
    """Held: the durable target's offsets come back wherever it stands."""
    urls = ["memory://", f"memory://{unique()}", f"honker+durable://{tmp_path / 'e.db'}"]
    composite = await alkpubsub.connect(urls)
    one = await composite.publish("a:b", 1)
    many = await composite.publish_many([("a:b", 2), ("a:b", 3)])
    forwarded = await composite.forward(_foreign_events(1)[0])
    await composite.close()
    offsets = [e.offset for e in (one, *many, forwarded)]
    assert all(isinstance(o, int) for o in offsets) and offsets == sorted(set(offsets))


async def test_composite_options_in_settings_options_are_not_passed_to_a_leg(
    tmp_path: Path,
) -> None:
    """Settings.options applies to every URL; composite_timeout there must
    either set the targets' timeout or be refused clearly, not reach a leg's
    own parser (or the local leg) as an unknown option."""
    settings = Settings.load(
        url=["memory://", f"honker+durable://{tmp_path / 'e.db'}"],
        options={"composite_timeout": "2"},
    )
    try:
        composite = await alkpubsub.connect(settings)
    except alkpubsub.ConfigError as exc:
        assert "composite_timeout" in str(exc)
        return
    timeout = composite.leg_stats[0].timeout
    await composite.close()
    assert timeout == 2.0


class _TimingOutTarget(InProcessTransport):
    """A target whose client raises its own TimeoutError (a socket timeout)."""

    async def send(self, event: Event, body: bytes) -> Event:
        raise TimeoutError("socket read timed out")


async def test_an_optional_target_raising_its_own_timeout_without_a_deadline() -> None:
    """An optional target with no composite_timeout (the constructor's default
    policy, or composite_timeout=0) whose client raises TimeoutError itself:
    _attempt formats ``f"{None:g}"`` and the TypeError escapes, failing the
    whole publish instead of counting the optional failure."""
    from alkpubsub.composite.legs import LegPolicy

    good = InProcessTransport(unique("bus"))
    composite = CompositeTransport(
        InProcessTransport(),
        good,
        _TimingOutTarget(unique("bus")),
        policies=[LegPolicy(), LegPolicy(required=False)],
    )
    async with composite.subscribe("a:b") as sub:
        sent = await composite.publish("a:b", 1)
        assert (await sub.get(timeout=1)).id == sent.id
    assert composite.leg_stats[1].failed == 1
    await composite.close()


async def test_a_required_target_raising_its_own_timeout_is_a_publish_error() -> None:
    """The same on a required target: PublishError, not a TypeError."""
    composite = CompositeTransport(InProcessTransport(), _TimingOutTarget(unique("bus")))
    with pytest.raises(PublishError):
        await composite.publish("a:b", 1)
    await composite.close()


async def test_closing_the_composite_under_concurrent_publishes(tmp_path: Path) -> None:
    """Held: the composite closed while 30 publishes are in flight: nothing
    hangs, and every publish that returned is in the durable log."""
    path = tmp_path / "e.db"
    composite = await alkpubsub.connect(["memory://", f"honker+durable://{path}"])
    await composite.publish("a:b", "warm")
    tasks = [asyncio.create_task(composite.publish("a:b", i)) for i in range(30)]
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await composite.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    ok = [r for r in results if isinstance(r, Event)]
    errors = [r for r in results if not isinstance(r, Event)]
    assert all(isinstance(e, alkpubsub.PubSubError) for e in errors), errors
    reader = await alkpubsub.connect(f"honker+durable://{path}")
    async with reader.subscribe("a:b", consumer="check", start="earliest") as sub:
        stored = {e.id for e in await _drain(sub, 0.5)}
    await reader.close()
    assert {e.id for e in ok} <= stored


async def test_subscribing_while_an_optional_target_hangs_does_not_hang(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """An optional redis target that is hung (SIGSTOP: the kernel still
    accepts connections, nothing answers) when a subscription starts: the
    subscription should go live on the other legs (as it does when the target
    is down) instead of waiting on the hung one."""
    honker = f"honker+durable://{tmp_path / 'e.db'}"
    optional = f"{redis_server.url}?composite_required=false&composite_timeout=0.3"
    composite = await alkpubsub.connect(["memory://", honker, optional])
    assert redis_server.pid is not None
    os.kill(redis_server.pid, signal.SIGSTOP)
    sub = composite.subscribe("a:b")
    try:
        started = time.monotonic()
        try:
            await asyncio.wait_for(sub.start(), 5)
        except TimeoutError:
            pytest.fail("subscribe() waited more than 5 s on a hung optional target")
        took = time.monotonic() - started
        sent = await composite.publish("a:b", 1)
        assert (await sub.get(timeout=1)).id == sent.id
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
        await sub.close()
        await composite.close()
    assert took < 2


async def test_durable_subscriptions_opened_and_closed_are_not_kept(tmp_path: Path) -> None:
    """A durable subscription on a composite is the durable target's own: it
    is registered in the composite's ``_subscriptions`` too, but ``close()``
    calls ``forget`` on its transport (the target) only, so the composite
    keeps every closed one: a worker that re-subscribes grows without bound."""
    composite = await alkpubsub.connect(["memory://", f"honker+durable://{tmp_path / 'e.db'}"])
    for _ in range(50):
        async with composite.subscribe("a:b", consumer="worker", start="earliest"):
            pass
        async with composite.subscribe("a:b"):
            pass
    kept = len(composite._subscriptions)  # type: ignore[attr-defined]
    await composite.close()
    assert kept == 0, f"{kept} closed subscriptions still referenced by the composite"
