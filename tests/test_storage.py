"""The Honker storage layer: transactions that publish, shared databases, retention,
the group-commit writer. Real SQLite files through honker; no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from brokers import in_ci

import alkpubsub
from alkpubsub import Closed, ConfigError, Event, InvalidTopic, PayloadError, PubSubError
from alkpubsub.conformance import collect
from alkpubsub.errors import PublishError, SQLError
from alkpubsub.limits import MAX_PAYLOAD_BYTES
from alkpubsub.storage import Store, Stores, open_store
from alkpubsub.transports.honker import HonkerTransport


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(tmp_path / "app.db")
    with opened.transaction() as tx:
        tx.execute("CREATE TABLE nodes (id INTEGER PRIMARY KEY, key TEXT NOT NULL)")
    yield opened
    opened.close()


def count(store: Store, sql: str, params: list[object] | None = None) -> int:
    return int(store.honker.query(sql, params or [])[0]["n"])


def stream_events(store: Store, stream: str = "events") -> list[Event]:
    rows = store.honker.query(
        "SELECT offset, payload FROM _honker_stream WHERE topic = ? ORDER BY offset", [stream]
    )
    return [Event.from_json(r["payload"], offset=r["offset"]) for r in rows]


# -- transactions ---------------------------------------------------------------


def test_transaction_commits_rows_and_events_together(store: Store) -> None:
    with store.transaction() as tx:
        tx.execute("INSERT INTO nodes (id, key) VALUES (?, ?)", (1, "call-1"))
        published = tx.publish("nodes:created", {"keys": ["call-1"]}, headers={"trace": "t1"})
        notified = tx.notify("cache:invalidate", {"graph": 1})
        # The transaction sees its own writes before it commits.
        assert tx.query("SELECT key FROM nodes") == [{"key": "call-1"}]

    assert count(store, "SELECT COUNT(*) AS n FROM nodes") == 1
    [stored] = stream_events(store)
    assert stored.id == published.id and stored.offset == published.offset
    assert stored.payload == {"keys": ["call-1"]} and stored.headers == {"trace": "t1"}
    assert stored.origin == store.origin
    [note] = store.honker.query("SELECT channel, payload FROM _honker_notifications")
    assert note["channel"] == "cache:invalidate"
    assert Event.from_json(note["payload"]).id == notified.id


def test_rollback_leaves_no_row_and_no_event(store: Store) -> None:
    with pytest.raises(ValueError, match="business rule"), store.transaction() as tx:
        tx.execute("INSERT INTO nodes (id, key) VALUES (?, ?)", (1, "call-1"))
        tx.publish("nodes:created", {"keys": ["call-1"]})
        tx.notify("cache:invalidate", {"graph": 1})
        raise ValueError("business rule broken")

    assert count(store, "SELECT COUNT(*) AS n FROM nodes") == 0
    assert count(store, "SELECT COUNT(*) AS n FROM _honker_stream") == 0
    assert count(store, "SELECT COUNT(*) AS n FROM _honker_notifications") == 0


def test_transaction_validates_topics_payloads_and_stream_names(store: Store) -> None:
    with store.transaction() as tx:
        with pytest.raises(InvalidTopic):
            tx.publish("bad topic", 1)
        with pytest.raises(PayloadError):
            tx.notify("ok", object())
        with pytest.raises(ConfigError, match="stream"):
            tx.publish("ok", 1, stream="no spaces")
        # The same limits as a transport's publish (alkpubsub.limits).
        with pytest.raises(PayloadError, match="key"):
            tx.publish("ok", 1, key="two\nlines")
        with pytest.raises(PayloadError, match="header"):
            tx.notify("ok", 1, headers={"bad name": "x"})
        with pytest.raises(PayloadError, match="bytes"):
            tx.publish("ok", "x" * (MAX_PAYLOAD_BYTES + 1))
        tx.publish("ok", 1, stream="audit")
    # The refused calls wrote nothing; the good one landed in its own stream.
    assert [e.payload for e in stream_events(store, "audit")] == [1]
    assert stream_events(store) == []


async def test_atransaction_commits_and_rolls_back_off_the_event_loop(store: Store) -> None:
    async with store.atransaction() as tx:
        await tx.execute("INSERT INTO nodes (id, key) VALUES (?, ?)", (1, "a"))
        event = await tx.publish("nodes:created", {"id": 1})
        # The SQL runs on the database's writer thread, never on the loop's thread.
        where = await tx.run(lambda _tx: threading.current_thread().name)
        assert where.startswith("alkpubsub-writer")
        assert await tx.query("SELECT COUNT(*) AS n FROM nodes") == [{"n": 1}]
    assert [e.id for e in stream_events(store)] == [event.id]

    with pytest.raises(RuntimeError, match="undo"):
        async with store.atransaction() as tx:
            await tx.execute("INSERT INTO nodes (id, key) VALUES (?, ?)", (2, "b"))
            await tx.notify("cache:invalidate", {})
            raise RuntimeError("undo")
    assert count(store, "SELECT COUNT(*) AS n FROM nodes") == 1
    assert count(store, "SELECT COUNT(*) AS n FROM _honker_notifications") == 0


async def test_sql_error_inside_atransaction_can_be_caught_and_the_rest_commits(
    store: Store,
) -> None:
    async with store.atransaction() as tx:
        with pytest.raises(SQLError, match="no such table"):
            await tx.execute("INSERT INTO missing (x) VALUES (1)")
        await tx.execute("INSERT INTO nodes (id, key) VALUES (?, ?)", (1, "kept"))
    assert count(store, "SELECT COUNT(*) AS n FROM nodes") == 1


async def test_writing_through_the_writer_inside_an_open_transaction_is_refused(
    store: Store,
) -> None:
    # The writer is busy with the open transaction: such a write would wait for
    # itself forever, so it is refused at once with a message saying what to do.
    async with store.atransaction():
        with pytest.raises(PubSubError, match=r"tx\.publish"):
            await store.append("events", [(None, "{}")])
    with store.transaction():
        with pytest.raises(PubSubError, match=r"tx\.publish"):
            await store.notify_many([("a", "{}")])
        with pytest.raises(PubSubError, match="nested"), store.transaction():
            pass


# -- one database per path ------------------------------------------------------


def test_open_store_shares_one_database_per_resolved_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.db").symlink_to(tmp_path / "app.db")
    first = open_store(tmp_path / "app.db")
    second = open_store("./app.db")
    third = open_store("link.db")
    assert first.shared.db is second.shared.db is third.shared.db
    assert first.path == str(tmp_path / "app.db")
    first.close()
    first.close()  # idempotent: releases one reference, once
    # The others still work: the database closes with its last handle.
    with second.transaction() as tx:
        tx.publish("still:open", 1)
    second.close()
    with third.transaction() as tx:
        tx.publish("still:open", 2)
    third.close()
    again = open_store(tmp_path / "app.db")
    assert again.shared.db is not second.shared.db
    assert len(stream_events(again)) == 2
    again.close()


def test_closed_store_refuses_use(tmp_path: Path) -> None:
    store = open_store(tmp_path / "app.db")
    store.close()
    with pytest.raises(Closed), store.transaction():
        pass
    with pytest.raises(Closed):
        store.honker  # noqa: B018


@pytest.mark.parametrize("bad", [":memory:", "", "file:app.db?mode=memory"])
def test_memory_databases_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="file"):
        open_store(bad)


def test_missing_directory_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; create it"):
        open_store(tmp_path / "nowhere" / "app.db")


# -- files: owner-only, and nothing left behind by a failed open ------------------


@contextlib.contextmanager
def unwritable_directory(parent: Path) -> Iterator[Path]:
    """A directory this process cannot create files in. As root (here, in CI
    containers) chmod stops nothing, so it is a read-only tmpfs mount; else chmod."""
    where = parent / "locked"
    where.mkdir()
    if os.geteuid() != 0:
        where.chmod(0o500)
        try:
            yield where
        finally:
            where.chmod(0o700)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        why = f"running as root and cannot mount a read-only tmpfs: {mounted.stderr!r}"
        if in_ci():
            pytest.fail(f"{why}; CI must be able to run this case")
        pytest.skip(why)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o277])
def test_new_database_files_are_owner_only_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        store = open_store(tmp_path / "private.db")
        with store.transaction() as tx:
            tx.execute("CREATE TABLE t (a)")  # the WAL exists once something is written
    finally:
        os.umask(old)
    try:
        modes = {s: mode(store.path + s) for s in ("", "-wal", "-shm", "-alkpubsub.lock")}
    finally:
        store.close()
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600, "-alkpubsub.lock": 0o600}


def test_an_existing_database_keeps_its_mode(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    open_store(path).close()
    os.chmod(path, 0o640)
    with open_store(path) as store, store.transaction() as tx:
        tx.execute("CREATE TABLE t (a)")
    assert mode(path) == 0o640


@pytest.mark.parametrize("case", ["missing directory", "directory", "not sqlite", "unwritable"])
def test_a_failed_open_raises_config_error_and_leaves_no_lock_file(
    tmp_path: Path, case: str
) -> None:
    with contextlib.ExitStack() as stack:
        where = tmp_path
        if case == "unwritable":
            where = stack.enter_context(unwritable_directory(tmp_path))
        path = where / "app.db"
        if case == "missing directory":
            path = tmp_path / "nowhere" / "app.db"
        elif case == "directory":
            path.mkdir()
        elif case == "not sqlite":
            path.write_bytes(b"these are my notes, not a database\n" * 100)
        with pytest.raises(ConfigError) as raised:
            open_store(path)
        assert not os.path.exists(f"{path}-alkpubsub.lock")
        assert str(path) in str(raised.value)
    if case == "not sqlite":
        assert path.read_bytes() == b"these are my notes, not a database\n" * 100


# -- automatic pruning of notifications --------------------------------------------

RETENTION = 1.0


async def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    """Poll ``condition`` every 20 ms for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {within} s")
        await asyncio.sleep(0.02)


def notifications(store: Store) -> int:
    return count(store, "SELECT COUNT(*) AS n FROM _honker_notifications")


async def test_notifications_are_pruned_once_older_than_the_retention(tmp_path: Path) -> None:
    store = open_store(tmp_path / "app.db", notify_retention=RETENTION)
    try:
        start = time.monotonic()
        for i in range(10):  # ten commits, on the loop and on the writer thread
            await store.notify_many([("cache:x", f'{{"n":{i}}}')] * (5 if i % 2 else 50))
        assert store.writer_stats.pruned_notifications == 0
        # Nothing is published from here on: the writer wakes up by itself to prune.
        await wait_for(lambda: notifications(store) == 0, RETENTION + 15, "pruning")
        gone = time.monotonic()
    finally:
        store.close()
    # No row can have been deleted before it was RETENTION old (each was committed
    # after `start`); this bound holds however slow the machine is.
    assert gone - start >= RETENTION
    assert store.writer_stats.pruned_notifications == 275


async def test_pruning_never_deletes_a_row_a_live_subscriber_has_not_read(tmp_path: Path) -> None:
    url = f"honker://{tmp_path}/app.db?notify_retention={RETENTION}"
    transport = await alkpubsub.connect(url)
    assert isinstance(transport, HonkerTransport)
    pruner = transport.store.shared.pruner
    assert pruner is not None and pruner.retention == RETENTION
    async with transport.subscribe("cache:*") as sub:
        sent = await transport.publish_many([("cache:x", i) for i in range(100)])
        # Stall this event loop before its watcher reads the rows, as a busy or
        # paused subscriber would, until the writer thread has run pruning passes
        # for longer than the retention: the rows are old enough, but unread.
        passes, stalled = pruner.passes, time.monotonic()
        while pruner.passes < passes + 2 or time.monotonic() - stalled < RETENTION * 1.5:
            time.sleep(0.01)  # noqa: ASYNC251 - the stall is the point
        got = await collect(sub, 100)
        assert [e.id for e in got] == [e.id for e in sent]
        # Once read, the rows go.
        await wait_for(lambda: notifications(transport.store) == 0, RETENTION + 15, "pruning")
    await transport.close()


@pytest.mark.parametrize(
    ("query", "retention"), [("", 60.0), ("?notify_retention=5", 5.0), ("?notify_retention=0", 0)]
)
async def test_notify_retention_comes_from_the_url(
    tmp_path: Path, query: str, retention: float
) -> None:
    scheme = "honker+durable" if retention == 5.0 else "honker"
    transport = await alkpubsub.connect(f"{scheme}://{tmp_path}/app.db{query}")
    store = transport.store  # type: ignore[attr-defined]
    pruner = store.shared.pruner
    assert (pruner.retention if pruner else 0) == retention
    await transport.close()


def test_bad_notify_retention_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="notify_retention"):
        open_store(tmp_path / "app.db", notify_retention=-1)


# -- Stores ---------------------------------------------------------------------


def test_stores_open_system_and_tenant_files_once(tmp_path: Path) -> None:
    with Stores(tmp_path / "data") as stores:
        system = stores.system()
        tenant = stores.tenant("org-42")
        assert system.path == str(tmp_path / "data" / "system.db")
        assert tenant.path == str(tmp_path / "data" / "tenant-org-42.db")
        assert stores.tenant("org-42") is tenant
        assert stores.tenant("A_b.c" + "x" * 123).path.endswith("x.db")  # 128 characters
    assert system.closed and tenant.closed


@pytest.mark.parametrize(
    "org_id",
    [
        "",
        "..",
        "../etc",
        "a/b",
        "a\\b",
        "a\x00b",
        ".hidden",
        "-flag",
        "a b",
        "a..b",
        "ü",
        "x" * 129,
    ],
)
def test_unsafe_tenant_ids_are_refused(tmp_path: Path, org_id: str) -> None:
    with Stores(tmp_path) as stores, pytest.raises(ConfigError, match="tenant id"):
        stores.tenant(org_id)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- retention --------------------------------------------------------------------


def publish_n(store: Store, n: int, stream: str = "events") -> list[Event]:
    with store.transaction() as tx:
        return [tx.publish("t", i, stream=stream) for i in range(n)]


def test_prune_keeps_the_newest_rows_per_stream(store: Store) -> None:
    publish_n(store, 10)
    publish_n(store, 4, stream="audit")
    with store.transaction() as tx:
        for i in range(6):
            tx.notify("n", i)
    counts = store.prune(keep_last=3)
    # 7 of 10 "events" rows, 1 of 4 "audit" rows, 3 of 6 notifications go.
    assert counts.stream_rows == {"events": 7, "audit": 1}
    assert counts.notifications == 3
    assert counts.total == 11
    assert [e.payload for e in stream_events(store)] == [7, 8, 9]
    assert [e.payload for e in stream_events(store, "audit")] == [1, 2, 3]


def test_prune_by_age_deletes_only_older_rows(store: Store) -> None:
    old = publish_n(store, 5)
    publish_n(store, 2)
    with store.transaction() as tx:  # back-date the first five by an hour
        tx.execute(
            "UPDATE _honker_stream SET created_at = created_at - 3600 WHERE offset <= ?",
            [old[-1].offset],
        )
    assert store.prune(older_than=600).stream_rows == {"events": 5}
    assert len(stream_events(store)) == 2


def test_prune_never_passes_the_slowest_consumer_unless_forced(store: Store) -> None:
    events = publish_n(store, 10)
    # "fast" is alkpubsub's (its row is namespaced), "slow" a honker-native consumer:
    # both hold back pruning.
    with store.transaction() as tx:
        for name, position in (("alkpubsub:fast", events[8].offset), ("slow", events[3].offset)):
            tx.query("SELECT honker_stream_save_offset(?, 'events', ?)", [name, position])
    counts = store.prune(keep_last=0)
    # "slow" has consumed the first four events: only those may go.
    assert counts.stream_rows == {"events": 4}
    assert counts.kept_for_consumers == {"events": events[3].offset}
    assert [e.payload for e in stream_events(store)] == list(range(4, 10))
    assert store.stream_head() == events[-1].offset
    assert store.prune(keep_last=0, force=True).stream_rows == {"events": 6}
    assert store.remove_consumer("slow") is False  # no alkpubsub consumer of that name
    assert store.remove_consumer("slow", kind="honker") is True
    assert store.consumer_offsets() == {"fast": events[8].offset}
    assert [(c.name, c.kind) for c in store.consumers()] == [("fast", "alkpubsub")]


async def test_aprune_runs_on_the_writer(store: Store) -> None:
    publish_n(store, 3)
    assert (await store.aprune(keep_last=1)).stream_rows == {"events": 2}


def test_prune_needs_a_rule(store: Store) -> None:
    with pytest.raises(ConfigError, match="older_than"):
        store.prune()
    with pytest.raises(ConfigError, match="keep_last"):
        store.prune(keep_last=-1)


# -- the group-commit writer --------------------------------------------------------


async def test_concurrent_publishes_share_one_commit(store: Store) -> None:
    before = store.writer_stats.commits
    # Eight publishers queue their rows in the same loop turn: one commit takes all.
    results = await asyncio.gather(
        *(store.append("events", [(None, f'{{"n":{i}}}')]) for i in range(8))
    )
    offsets = [o for [o] in results]
    assert store.writer_stats.commits - before == 1
    assert offsets == list(range(offsets[0], offsets[0] + 8))  # in submission order


async def test_a_failing_write_fails_alone(store: Store) -> None:
    async def broken() -> None:
        await store.write(lambda tx: tx.execute("INSERT INTO missing (x) VALUES (1)"))

    outcome = await asyncio.gather(
        store.append("events", [(None, "{}")]),
        broken(),
        store.append("events", [(None, "{}")]),
        return_exceptions=True,
    )
    assert isinstance(outcome[1], SQLError) and "no such table" in str(outcome[1])
    assert isinstance(outcome[0], list) and isinstance(outcome[2], list)
    assert count(store, "SELECT COUNT(*) AS n FROM _honker_stream") == 2
    assert store.writer_stats.failed_jobs == 1


async def test_merged_inserts_keep_offsets_and_isolate_a_failing_job(store: Store) -> None:
    # Consecutive appends are written with multi-row INSERTs; a row that fails
    # (payload NULL breaks NOT NULL) must fail its own job only, and every other
    # job's offsets must name its own rows, across streams and chunk sizes.
    jobs = [store.append("events", [(None, f'{{"n":{i}}}')] * (i % 3 + 1)) for i in range(12)]
    jobs.insert(5, store.append("events", [(None, None)]))  # type: ignore[list-item]
    jobs.insert(8, store.append("other", [(None, '{"o":1}')] * 70))
    jobs.insert(9, store.notify_many([("a:b", "{}")] * 9))
    outcome = await asyncio.gather(*jobs, return_exceptions=True)
    assert isinstance(outcome[5], PublishError)
    assert outcome[9] is None
    assert store.writer_stats.failed_jobs == 1
    rows = store.honker.query("SELECT offset, topic, payload FROM _honker_stream ORDER BY offset")
    by_offset = {r["offset"]: (r["topic"], r["payload"]) for r in rows}
    assert len(by_offset) == sum(i % 3 + 1 for i in range(12)) + 70
    for index, offsets in enumerate(outcome):
        if index in (5, 9):
            continue
        assert isinstance(offsets, list)
        if index == 8:
            assert {by_offset[o] for o in offsets} == {("other", '{"o":1}')} and len(offsets) == 70
        else:
            i = index if index < 5 else index - 1 if index < 8 else index - 3
            assert [by_offset[o] for o in offsets] == [("events", f'{{"n":{i}}}')] * (i % 3 + 1)
    assert count(store, "SELECT COUNT(*) AS n FROM _honker_notifications") == 9


async def test_large_batches_commit_on_the_writer_thread(store: Store) -> None:
    rows = [(None, f'{{"n":{i}}}') for i in range(500)]
    offsets = await store.append("events", rows)
    assert len(offsets) == 500 and offsets == sorted(set(offsets))
    # 500 rows exceed the event loop's inline limit (32): the thread committed them.
    assert store.writer_stats.commits - store.writer_stats.inline_commits >= 1


HOLD_LOCK = """
import sys, time
from alkpubsub.storage import open_store
store = open_store(sys.argv[1])
with store.transaction() as tx:
    tx.execute("INSERT INTO nodes (key) VALUES ('from child')")
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
store.close()
"""


async def hold_write_lock(path: str, seconds: float) -> asyncio.subprocess.Process:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_LOCK, path, str(seconds), stdout=subprocess.PIPE
    )
    assert child.stdout is not None
    assert await child.stdout.readline() == b"held\n"
    return child


async def test_waiting_for_another_process_does_not_block_the_event_loop(
    store: Store,
) -> None:
    child = await hold_write_lock(store.path, 0.6)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        [offset] = await store.append("events", [(None, "{}")])
    finally:
        ticker.cancel()
    await child.wait()
    # The publish waited ~0.6 s for the child's transaction; meanwhile the loop ran
    # the 10 ms ticker (a blocked loop would have let it tick at most once).
    assert ticks >= 10
    assert offset >= 1
    assert count(store, "SELECT COUNT(*) AS n FROM nodes") == 1


async def test_a_write_gives_up_after_busy_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.db")
    with open_store(path) as setup, setup.transaction() as tx:
        tx.execute("CREATE TABLE nodes (id INTEGER PRIMARY KEY, key TEXT)")
    impatient = open_store(path, busy_timeout=0.2)
    child = await hold_write_lock(path, 1.5)
    try:
        with pytest.raises(PublishError, match="busy_timeout"):
            await impatient.append("events", [(None, "{}")])
    finally:
        impatient.close()
        await child.wait()
    assert child.returncode == 0


def test_the_lock_sidecar_sits_next_to_the_database(store: Store) -> None:
    assert os.path.exists(store.path + "-alkpubsub.lock")
