"""The Honker durable transport's own behaviours (the shared ones are in
test_conformance_honker.py): transactional publish, options, position saving,
pattern skips, malformed rows, and crash cases with real processes killed by
SIGKILL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from test_honker import Statement, envelope, write_foreign_rows

import alkpubsub
from alkpubsub import ConfigError, ConsumerBusy, Event, Settings
from alkpubsub.conformance import collect, collect_acking, nothing_more
from alkpubsub.transports.honker_durable import HonkerDurableTransport, from_url


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"honker+durable://{tmp_path}/events.db"


async def durable(url: str) -> HonkerDurableTransport:
    transport = await alkpubsub.connect(url)
    assert isinstance(transport, HonkerDurableTransport)
    return transport


async def test_store_publish_is_delivered_exactly_when_the_transaction_commits(
    url: str,
) -> None:
    transport = await durable(url)
    store = transport.store
    async with transport.subscribe("nodes:*", consumer="indexer") as sub:
        with pytest.raises(RuntimeError), store.transaction() as tx:
            tx.publish("nodes:created", {"id": "rolled back"})
            raise RuntimeError("abort")
        async with store.atransaction() as atx:
            sent = await atx.publish("nodes:created", {"id": 1})
            await nothing_more(sub, 0.2)  # written, not yet committed: invisible
        [got] = await collect_acking(sub, 1)
        await nothing_more(sub)
    assert got.id == sent.id and got.offset == sent.offset
    await transport.close()


def test_options_come_from_the_url_and_settings() -> None:
    default = from_url("honker+durable:///tmp/x.db")
    assert (default.stream, default.max_deliveries, default.consumer_ttl) == ("events", 5, 30)
    tuned = from_url(
        "honker+durable:///tmp/x.db?stream=audit&max_deliveries=3&consumer_ttl=10&read_batch=64"
    )
    assert (tuned.stream, tuned.max_deliveries, tuned.consumer_ttl, tuned.read_batch) == (
        "audit",
        3,
        10,
        64,
    )
    # Settings.max_deliveries applies unless the URL says otherwise.
    settings = Settings.load(max_deliveries=7)
    assert from_url("honker+durable:///tmp/x.db", settings).max_deliveries == 7
    assert from_url("honker+durable:///tmp/x.db?max_deliveries=2", settings).max_deliveries == 2


@pytest.mark.parametrize(
    "query", ["stream=no%20spaces", "max_deliveries=0", "consumer_ttl=1", "nope=1"]
)
def test_bad_options_are_refused(query: str) -> None:
    with pytest.raises(ConfigError):
        from_url(f"honker+durable:///tmp/x.db?{query}")


async def test_idle_consumer_persists_its_last_ack_promptly(url: str) -> None:
    transport = await durable(url)
    async with transport.subscribe("jobs", consumer="worker") as sub:
        sent = [await transport.publish("jobs", i) for i in range(3)]
        await collect_acking(sub, 3)
        # No further event arrives and the subscription stays open: the last ack
        # must still reach the database, not wait for the next event.
        for _ in range(500):
            if transport.store.consumer_offsets().get("worker") == sent[-1].offset:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail(f"position not saved within 5 s: {transport.store.consumer_offsets()}")
    await transport.close()


async def test_rows_of_other_topics_advance_the_position_silently(url: str) -> None:
    transport = await durable(url)
    async with transport.subscribe("a:*", consumer="worker") as sub:
        await transport.publish("b", 0)
        wanted = await transport.publish("a:1", 1)
        await transport.publish("b", 2)
        last = await transport.publish("b", 3)
        [got] = await collect_acking(sub, 1)
        await nothing_more(sub)
    assert got.id == wanted.id
    # Closing saved the position past the skipped rows after the acked one.
    assert transport.store.consumer_offsets() == {"worker": last.offset}
    await transport.close()


async def test_malformed_row_is_counted_dead_lettered_and_skipped(url: str) -> None:
    transport = await durable(url)
    # Claims to be ours (the "alkpubsub" key) but has no published_at.
    broken = '{"alkpubsub":1,"id":"x","topic":"jobs:a","headers":{},"payload":1}'
    async with (
        transport.subscribe("jobs:*", consumer="worker") as sub,
        transport.subscribe("dead:jobs:a", consumer="janitor") as dead,
    ):
        with transport.store.transaction() as tx:
            tx.execute(
                "INSERT INTO _honker_stream (topic, key, payload) VALUES ('events', NULL, ?)",
                [broken],
            )
        good = await transport.publish("jobs:a", "fine")
        [got] = await collect_acking(sub, 1)
        [buried] = await collect_acking(dead, 1)
    assert got.id == good.id
    assert sub.stats.malformed == 1 and sub.stats.dead_lettered == 1
    assert buried.payload == broken
    assert buried.headers["x-dead-reason"].startswith("malformed event envelope")
    assert buried.headers["x-dead-kind"] == "malformed"
    assert buried.headers["x-original-topic"] == "jobs:a"
    await transport.close()


async def test_anonymous_subscription_keeps_no_position(url: str) -> None:
    transport = await durable(url)
    first = await transport.publish("t", 0)
    assert first.offset is not None
    async with transport.subscribe("t", start=first.offset) as sub:
        [got] = await collect(sub, 1)
        await sub.ack(got)
    assert got.id == first.id
    assert transport.store.consumer_offsets() == {}
    await transport.close()


# -- crashes: real processes, killed with SIGKILL -------------------------------------

HOLDER = """
import asyncio, sys, alkpubsub
async def main():
    t = await alkpubsub.connect(sys.argv[1])
    sub = t.subscribe("jobs", consumer="worker")
    await sub.start()
    print("holding", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""

WORKER = """
import asyncio, sys, alkpubsub
async def main():
    t = await alkpubsub.connect(sys.argv[1])
    async with t.subscribe("jobs", consumer="worker", start="earliest") as sub:
        saved = 0
        async for event in sub:
            print("got", event.offset, flush=True)
            await asyncio.sleep(0.002)  # "work"
            await sub.ack(event)
            print("acked", event.offset, flush=True)
            if sub.saved_position != saved:
                saved = sub.saved_position
                print("saved", saved, flush=True)
asyncio.run(main())
"""

BATCHER = """
import asyncio, sys, alkpubsub
async def main():
    t = await alkpubsub.connect(sys.argv[1])
    b = 0
    while True:
        await t.publish_many([("batch", {"b": b, "i": i}) for i in range(50)])
        print(b, flush=True)
        b += 1
asyncio.run(main())
"""


async def spawn(code: str, url: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, url, stdout=subprocess.PIPE
    )


async def read_until(child: asyncio.subprocess.Process, done: object) -> list[str]:
    """Lines from ``child`` until ``done(lines)`` is true."""
    assert child.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(30):
        while not done(lines):  # type: ignore[operator]
            line = await child.stdout.readline()
            assert line, f"child ended early after {lines[-3:]}"
            lines.append(line.decode().strip())
    return lines


async def test_consumer_name_is_busy_across_processes_until_its_holder_dies(url: str) -> None:
    transport = await durable(url)
    child = await spawn(HOLDER, url)
    await read_until(child, lambda lines: lines == ["holding"])
    with pytest.raises(ConsumerBusy, match=f"'worker'.*process {child.pid}"):
        await transport.subscribe("jobs", consumer="worker").start()
    child.kill()
    await child.wait()
    # The holder's pid is gone: its lease is taken over at once, not after the TTL.
    async with transport.subscribe("jobs", consumer="worker") as sub:
        sent = await transport.publish("jobs", "after")
        [got] = await collect_acking(sub, 1)
    assert got.id == sent.id
    await transport.close()


async def test_consumer_killed_mid_stream_resumes_without_loss(url: str) -> None:
    transport = await durable(url)
    sent = await transport.publish_many([("jobs", i) for i in range(300)])
    offsets = [e.offset for e in sent if e.offset is not None]
    assert len(offsets) == 300
    child = await spawn(WORKER, url)
    lines = await read_until(child, lambda ls: sum(x.startswith("acked") for x in ls) >= 100)
    child.kill()  # SIGKILL: no cleanup, no final save
    out, _ = await child.communicate()
    lines += out.decode().splitlines()
    acked = {int(x.split()[1]) for x in lines if x.startswith("acked")}
    seen_saved = max((int(x.split()[1]) for x in lines if x.startswith("saved")), default=0)
    saved = transport.store.consumer_offsets()["worker"]
    assert seen_saved <= saved < offsets[-1]

    # A restart of the consumer (here, in this process) continues after the saved position.
    pending = [o for o in offsets if o > saved]
    async with transport.subscribe("jobs", consumer="worker") as sub:
        rest = await collect_acking(sub, len(pending))
        await nothing_more(sub)
    assert [e.offset for e in rest] == pending  # nothing lost, in order
    assert all(o in acked for o in offsets if o <= saved)
    # Redelivered after the crash: only events acked after the last save that
    # completed (the documented window), never one acked before it.
    redelivered = acked & set(pending)
    assert all(o > seen_saved for o in redelivered)
    await transport.close()


async def test_publisher_killed_mid_batch_leaves_only_whole_batches(url: str) -> None:
    child = await spawn(BATCHER, url)
    lines = await read_until(child, lambda ls: len(ls) >= 20)
    child.kill()
    out, _ = await child.communicate()
    reported = {int(x) for x in lines + out.decode().split()}

    transport = await durable(url)
    rows = transport.store.honker.query(
        "SELECT offset, payload FROM _honker_stream WHERE topic = 'events' ORDER BY offset"
    )
    events = [Event.from_json(r["payload"]) for r in rows]  # every row is whole
    batches: dict[int, list[int]] = {}
    for event in events:
        batches.setdefault(event.payload["b"], []).append(event.payload["i"])
    # Each publish_many of 50 is one commit: all 50 rows or none, in order.
    assert all(items == list(range(50)) for items in batches.values())
    assert reported <= set(batches)
    assert sorted(batches) == list(range(len(batches)))
    await transport.close()


# -- rows written by other SQLite clients ------------------------------------------


APPEND = "INSERT INTO _honker_stream (topic, key, payload) VALUES (?, ?, ?)"


def garbage_stream_rows(stream: str, topic: str) -> list[Statement]:
    """Rows of ``stream`` that a durable subscription to ``topic`` reads and must
    count as malformed, one per kind of garbage another SQLite client can write
    (foreign JSON and text are adopted instead: see test_honker_foreign.py)."""
    event, _ = Event.create(topic, "x", origin="foreign")
    head = f'{{"alkpubsub": 1, "id": "{event.id}", "topic": "{topic}", '
    return [
        (APPEND, [stream, None, b"\x00\xff"]),  # BLOB payload
        (APPEND, [stream, None, envelope(topic).encode()]),  # a valid envelope, as a BLOB
        (
            "INSERT INTO _honker_stream (topic, payload) VALUES (?, CAST(? AS TEXT))",
            [stream, b"\xff\xfe"],
        ),  # TEXT that is not UTF-8 (honker reads it as '')
        # Claim to be ours (the "alkpubsub" key) and name `topic`, but are invalid:
        (APPEND, [stream, None, head + '"payload": 1}']),  # no published_at
        (APPEND, [stream, b"\x01", envelope(topic).replace('"alkpubsub":1', '"alkpubsub":2')]),
        (APPEND, [stream, None, envelope(topic, "~").replace('"~"', DEEP_PAYLOAD)]),  # too deep
    ]


CLAIMED = 3
"""Rows of garbage_stream_rows that name the topic (a named consumer dead-letters them)."""
DEEP_PAYLOAD = "[" * 150 + "]" * 150
"""JSON nested beyond the publish limit (100 levels)."""


@pytest.mark.parametrize("consumer", [None, "worker"])
async def test_foreign_rows_of_any_type_do_not_stop_durable_readers(
    url: str, consumer: str | None
) -> None:
    transport = await durable(url)
    garbage = garbage_stream_rows("events", "jobs:raw")
    # Rows whose topic column is not the stream's name (a BLOB 'events') are not part
    # of the stream at all: nobody reads them.
    unread: list[Statement] = [(APPEND, [b"events", None, envelope("jobs:raw")])]
    async with (
        transport.subscribe("jobs:raw", consumer=consumer, start="earliest") as exact,
        transport.subscribe("jobs:*", start="earliest") as wild,
    ):
        await write_foreign_rows(transport.store.path, garbage + unread)
        sent = await transport.publish("jobs:raw", "after")
        for sub in (exact, wild):
            [got] = await collect_acking(sub, 1)
            assert got.id == sent.id
            assert sub.stats.malformed == len(garbage)
    # Only the rows whose envelope names the topic are filed under it.
    assert exact.stats.dead_lettered == (CLAIMED if consumer else 0)
    await transport.close()


async def test_a_dead_letter_that_keeps_failing_is_redelivered_never_buried_again(
    tmp_path: Path,
) -> None:
    transport = await durable(f"honker+durable://{tmp_path}/events.db?max_deliveries=2")
    async with (
        transport.subscribe("jobs:x", consumer="worker") as sub,
        transport.subscribe("dead:jobs:x", consumer="ops") as ops,
        transport.subscribe(">", consumer="all") as everything,
    ):
        sent = await transport.publish("jobs:x", 1)
        for _ in range(2):
            [event] = await collect(sub, 1)
            await sub.nack(event, reason="boom")
        # The ops consumer fails on the dead letter five times: it keeps coming
        # back (2 = max_deliveries does not apply to dead letters), never copied.
        for _ in range(5):
            [letter] = await collect(ops, 1)
            await ops.nack(letter, reason="ops failed too")
        [letter] = await collect_acking(ops, 1)
        [only] = await collect_acking(everything, 1)  # '>' sees the event, not its letter
        await nothing_more(everything)
    assert letter.topic == "dead:jobs:x" and letter.headers["x-dead-reason"] == "boom"
    assert only.id == sent.id
    assert ops.stats.dead_lettered == 0 and ops.stats.redelivered == 5
    rows = transport.store.rows_after("events", 0, 100)
    assert len(rows) == 2  # the event and one dead letter
    await transport.close()
