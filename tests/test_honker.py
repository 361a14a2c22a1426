"""The Honker ephemeral transport's own behaviours (the shared ones are in
test_conformance_honker.py): URL rules, the shared watcher, transactional
notify, malformed rows, and delivery between real processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

import alkpubsub
from alkpubsub import ConfigError, Event
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
    assert first.store.honker is second.store.honker
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
            # A foreign writer's notification: JSON, but not an alkpubsub envelope.
            tx.honker.notify("jobs:raw", {"not": "an envelope"})
        await transport.publish("jobs:ok", 1)
        [got] = await collect(sub, 1)
    assert got.payload == 1
    assert sub.stats.malformed == 1
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
