"""The Honker ephemeral transport's own behaviours (the shared ones are in
test_conformance_honker.py): URL rules, the shared watcher, transactional
notify, malformed rows, and delivery between real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import alkpubsub
from alkpubsub import ConfigError, ConnectionLost, Event
from alkpubsub.config import parse_url
from alkpubsub.conformance import collect, nothing_more
from alkpubsub.transports._honker_common import database_path
from alkpubsub.transports.honker import HonkerSubscription, HonkerTransport


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"honker://{tmp_path}/events.db"


@pytest.mark.parametrize(
    ("given", "path"),
    [
        ("honker:///var/lib/app/events.db", "/var/lib/app/events.db"),
        ("honker:///./events.db", "./events.db"),
        ("honker:///../data/events.db", "../data/events.db"),
        ("honker://./events.db", "./events.db"),
        ("honker+durable:///./events.db?stream=audit", "./events.db"),
        ("honker:///tmp/with%20space.db", "/tmp/with space.db"),
    ],
)
def test_url_names_the_database_file(given: str, path: str) -> None:
    assert database_path(parse_url(given)) == path


@pytest.mark.parametrize(
    ("given", "hint"),
    [
        ("honker://events.db", "names host"),
        ("honker:///:memory:", "in-memory"),
        ("honker:///", "no database file"),
        ("honker:///./", "no database file"),
    ],
)
def test_url_without_a_usable_file_is_refused(given: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=hint):
        database_path(parse_url(given))


async def test_unknown_option_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="unknown option 'stream'"):
        await alkpubsub.connect(f"{url}?stream=events")


async def test_relative_url_opens_the_file_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    transport = await alkpubsub.connect("honker:///./here.db")
    try:
        assert transport.store.path == str(tmp_path / "here.db")  # type: ignore[attr-defined]
    finally:
        await transport.close()


async def test_every_subscription_on_a_file_shares_one_watcher(url: str) -> None:
    first, second = await alkpubsub.connect(url), await alkpubsub.connect(url)
    assert isinstance(first, HonkerTransport) and isinstance(second, HonkerTransport)
    subs = [t.subscribe(f"topic:{i}") for t in (first, second) for i in range(50)]
    for sub in subs:
        await sub.start()
    shared = first.store.shared
    # 100 subscriptions on two transports: one watcher (one honker wake-up
    # iterator, one notification query per wake) serves them all.
    assert first.store.shared.db is second.store.shared.db
    assert len({id(s._watcher) for s in subs if isinstance(s, HonkerSubscription)}) == 1
    assert len(shared._watchers) == 1
    await first.publish("topic:7", "x")
    got = await collect(subs[7], 1) + await collect(subs[57], 1)
    assert [e.payload for e in got] == ["x", "x"]
    await first.close()
    await second.close()
    # The watcher stops with the last subscription.
    assert shared._watchers == {}


async def test_notify_in_a_store_transaction_arrives_only_if_it_commits(url: str) -> None:
    transport = await alkpubsub.connect(url)
    assert isinstance(transport, HonkerTransport)
    store = transport.store
    async with transport.subscribe("cache:*") as sub:
        with pytest.raises(RuntimeError), store.transaction() as tx:
            tx.notify("cache:invalidate", {"graph": "rolled back"})
            raise RuntimeError("abort")
        async with store.atransaction() as atx:
            sent = await atx.notify("cache:invalidate", {"graph": 1})
            # Not visible to subscribers before the commit.
            await nothing_more(sub, 0.2)
        [got] = await collect(sub, 1)
        await nothing_more(sub)
    assert got.id == sent.id and got.origin == transport.origin
    await transport.close()


async def test_malformed_notification_is_counted_and_does_not_stop_the_subscription(
    url: str,
) -> None:
    transport = await alkpubsub.connect(url)
    assert isinstance(transport, HonkerTransport)
    async with transport.subscribe("jobs:>") as sub:
        with transport.store.transaction() as tx:
            # Claims to be ours (the "alkpubsub" key) but is no valid envelope.
            tx.honker.notify("jobs:raw", {"alkpubsub": 1, "topic": "jobs:raw"})
        await transport.publish("jobs:ok", 1)
        [got] = await collect(sub, 1)
    assert got.payload == 1
    assert sub.stats.malformed == 1
    await transport.close()


async def test_topic_spoofing_is_refused(url: str) -> None:
    # A raw client writes, on channel graph:created, an envelope saying secret:payroll.
    transport = await alkpubsub.connect(url)
    assert isinstance(transport, HonkerTransport)
    spoof = envelope("secret:payroll", {"salary": 1})
    async with transport.subscribe("graph:*") as graph, transport.subscribe("secret:>") as secret:
        await write_foreign_rows(transport.store.path, [(NOTIFY, ["graph:created", spoof])])
        await nothing_more(graph)
        await nothing_more(secret)
    assert graph.stats.malformed == 1
    assert secret.stats.malformed == 0  # the channel decides whose row it is
    await transport.close()


async def test_events_committed_before_subscribing_are_not_delivered(url: str) -> None:
    transport = await alkpubsub.connect(url)
    await transport.publish("old:news", 1)
    async with transport.subscribe("old:news") as sub:
        await transport.publish("old:news", 2)
        [got] = await collect(sub, 1)
        await nothing_more(sub)
    assert got.payload == 2
    await transport.close()


# -- between processes --------------------------------------------------------------

PUBLISHER = """
import asyncio, sys, alkpubsub
async def main():
    t = await alkpubsub.connect(sys.argv[1])
    for i in range(int(sys.argv[2])):
        e = await t.publish("xproc:data", {"i": i})
        print(e.id, flush=True)
    await t.close()
asyncio.run(main())
"""

SUBSCRIBER = """
import asyncio, sys, alkpubsub
async def main():
    t = await alkpubsub.connect(sys.argv[1])
    async with t.subscribe("xproc:>") as sub:
        print("ready", flush=True)
        for _ in range(int(sys.argv[2])):
            e = await sub.get(timeout=20)
            print(e.id, e.origin, flush=True)
    await t.close()
asyncio.run(main())
"""


async def run_child(code: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, stdout=subprocess.PIPE
    )


async def test_another_process_publishes_and_this_one_receives(url: str) -> None:
    transport = await alkpubsub.connect(url)
    async with transport.subscribe("xproc:*") as sub:
        child = await run_child(PUBLISHER, url, "20")
        out, _ = await child.communicate()
        got = await collect(sub, 20)
    sent = out.decode().split()
    assert [e.id for e in got] == sent  # all 20, in publish order
    assert {e.origin for e in got} != {transport.origin}
    assert [e.payload["i"] for e in got] == list(range(20))
    await transport.close()


async def test_this_process_publishes_and_another_one_receives(url: str) -> None:
    transport = await alkpubsub.connect(url)
    child = await run_child(SUBSCRIBER, url, "20")
    assert child.stdout is not None
    assert await asyncio.wait_for(child.stdout.readline(), 20) == b"ready\n"
    sent: list[Event] = [await transport.publish("xproc:data", i) for i in range(20)]
    out, _ = await asyncio.wait_for(child.communicate(), 20)
    lines = [line.split() for line in out.decode().splitlines()]
    assert child.returncode == 0
    assert [line[0] for line in lines] == [e.id for e in sent]
    assert {line[1] for line in lines} == {transport.origin}
    await transport.close()


# -- rows written by other SQLite clients ------------------------------------------

FOREIGN_SQL = """
import json, sqlite3, sys
c = sqlite3.connect(sys.argv[1], timeout=30)
for sql, params in json.load(sys.stdin):
    c.execute(sql, [bytes.fromhex(p["hex"]) if isinstance(p, dict) else p for p in params])
c.commit()
c.close()
"""

Statement = tuple[str, list[object]]


async def write_foreign_rows(path: str, statements: list[Statement]) -> None:
    """Run ``statements`` on ``path`` in one transaction of another process using
    Python's sqlite3 (a second SQLite library in THIS process would break honker's
    locks). ``bytes`` parameters are bound as BLOBs."""
    encoded = [
        (sql, [{"hex": p.hex()} if isinstance(p, bytes) else p for p in params])
        for sql, params in statements
    ]
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FOREIGN_SQL, path, stdin=subprocess.PIPE
    )
    await asyncio.wait_for(child.communicate(json.dumps(encoded).encode()), 30)
    assert child.returncode == 0


def envelope(topic: str, payload: object = "x") -> str:
    """A valid alkpubsub envelope text for ``topic``."""
    event, body = Event.create(topic, payload, origin="foreign")
    return event.envelope(body).decode()


DEEP = "[" * 100_000 + "]" * 100_000
HUGE = '{"n": 1e999999, "m": ' + "9" * 5000 + "}"
NOTIFY = "INSERT INTO _honker_notifications (channel, payload) VALUES (?, ?)"


def garbage_notifications(topic: str) -> list[Statement]:
    """Notification rows a live subscription to ``topic`` reads and must count as
    malformed, one per kind of garbage another SQLite client can write. (Foreign
    JSON or text is adopted instead: see test_honker_foreign.py.)"""
    return [
        (NOTIFY, [topic.encode(), envelope(topic)]),  # BLOB channel (the topic's bytes)
        (NOTIFY, [b"\x00\xff", envelope(topic)]),  # BLOB channel naming no topic
        (NOTIFY, [topic, b"\x00\xff"]),  # BLOB payload
        (NOTIFY, [topic, envelope(topic).encode()]),  # a valid envelope, but as a BLOB
        (NOTIFY, [topic, envelope("someone:else")]),  # envelope topic != channel
        (NOTIFY, [topic, f'{{"alkpubsub": 1, "topic": "{topic}"}}']),  # claims to be ours
        (NOTIFY, [topic, envelope(topic, "~").replace('"~"', "[" * 150 + "]" * 150)]),
        (NOTIFY, [topic, '{"specversion": "1.0", "id": "x"}']),  # an invalid CloudEvent
        (
            "INSERT INTO _honker_notifications (channel, payload) VALUES (?, CAST(? AS TEXT))",
            [topic, b"\xff\xfe"],
        ),  # TEXT that is not UTF-8
    ]


async def test_foreign_rows_of_any_type_do_not_stop_live_subscriptions(url: str) -> None:
    transport = await alkpubsub.connect(url)
    assert isinstance(transport, HonkerTransport)
    garbage = garbage_notifications("jobs:raw")
    async with transport.subscribe("jobs:raw") as exact, transport.subscribe("jobs:>") as wild:
        await write_foreign_rows(transport.store.path, garbage)
        await transport.publish("jobs:raw", "after")
        for sub in (exact, wild):
            [got] = await collect(sub, 1)
            assert got.payload == "after"
            assert sub.stats.malformed == len(garbage)
        # A subscription opened now works too (the watcher never stopped).
        async with transport.subscribe("jobs:raw") as later:
            await transport.publish("jobs:raw", "later")
            [got] = await collect(later, 1)
            assert got.payload == "later"
    await transport.close()


async def test_a_valid_envelope_with_a_foreign_created_at_is_delivered(url: str) -> None:
    transport = await alkpubsub.connect(url)
    assert isinstance(transport, HonkerTransport)
    sent = envelope("jobs:raw", 7)
    async with transport.subscribe("jobs:raw") as sub:
        await write_foreign_rows(
            transport.store.path,
            [
                (
                    "INSERT INTO _honker_notifications (channel, payload, created_at) "
                    "VALUES (?, ?, ?)",
                    ["jobs:raw", sent, "not a time"],
                ),
                (NOTIFY, [5, envelope("5")]),  # integer channel: stored as the text '5'
            ],
        )
        [got] = await collect(sub, 1)
    assert got.payload == 7 and sub.stats.malformed == 0
    await transport.close()


class BrokenSubscription(HonkerSubscription):
    """A subscription with a bug: taking the event "boom" raises."""

    def push(self, event: Event) -> None:
        if event.payload == "boom":
            raise RuntimeError("a bug in a subscription")
        super().push(event)


async def test_an_unforeseen_error_on_one_row_is_logged_once_and_skipped(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    transport = await alkpubsub.connect(url)
    assert isinstance(transport, HonkerTransport)
    broken = BrokenSubscription(transport, "jobs:>")
    # The broken one is served first, so the healthy one shows nothing was skipped for it.
    async with broken, transport.subscribe("jobs:>") as healthy:
        sent = await transport.publish_many([("jobs:a", "boom"), ("jobs:a", 1), ("jobs:a", 2)])
        sent.append(await transport.publish("jobs:a", "boom"))
        got = await collect(healthy, 4)
        # The broken one lost only the rows it raised on; the watcher went on.
        assert [e.payload for e in await collect(broken, 2)] == [1, 2]
        await nothing_more(broken)
        assert transport.store.watcher().errors == 2
    assert [e.id for e in got] == [e.id for e in sent]
    logged = [r for r in caplog.records if "raised RuntimeError" in r.getMessage()]
    assert len(logged) == 1  # once, though it happened twice
    await transport.close()


# -- when the file itself goes away -------------------------------------------------

REPLACEMENT = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("CREATE TABLE unrelated (a)")
c.commit()
c.close()
"""


async def replace_file(path: str) -> None:
    """Swap a fresh SQLite file in at ``path`` (as a restore from backup would)."""
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", REPLACEMENT, path + ".new")
    assert await asyncio.wait_for(child.wait(), 30) == 0
    os.replace(path + ".new", path)


def delete_file(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


@pytest.mark.parametrize("how", ["replaced", "deleted"])
async def test_a_lost_file_fails_subscriptions_loudly_and_a_new_transport_works(
    url: str, how: str
) -> None:
    transport = await alkpubsub.connect(url)
    assert isinstance(transport, HonkerTransport)
    path = transport.store.path
    async with transport.subscribe("a:b") as sub:
        await transport.publish("a:b", 1)
        await collect(sub, 1)
        if how == "replaced":
            await replace_file(path)
        else:
            delete_file(path)
        with pytest.raises(ConnectionLost, match=how):
            await sub.get(timeout=10)
    # Neither a new subscription nor a publish on the old transport may go silently
    # to the old file: both say so.
    with pytest.raises(ConnectionLost, match=how):
        async with transport.subscribe("a:b") as again:
            await again.get(timeout=10)
    with pytest.raises(ConnectionLost, match=how):
        await transport.publish("a:b", 2)
    # Opening the path again while the old file is still open here is refused:
    # the new file would share the old one's -wal and -shm.
    with pytest.raises(ConnectionLost, match="close them all first"):
        await alkpubsub.connect(url)
    await transport.close()
    # Once closed, a new transport opens the file now at the path and sees other processes.
    fresh = await alkpubsub.connect(url)
    async with fresh.subscribe("xproc:*") as sub:
        child = await run_child(PUBLISHER, url, "3")
        await asyncio.wait_for(child.communicate(), 30)
        got = await collect(sub, 3)
    assert [e.payload["i"] for e in got] == [0, 1, 2]
    await fresh.close()
