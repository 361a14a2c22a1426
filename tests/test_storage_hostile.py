"""Hostile tests of the Honker storage additions: typed SQL errors, honker ops in
a store transaction and the guard, ack=saved, tenants by URL."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

import alkpubsub
from alkpubsub import ConfigError, PayloadError
from alkpubsub.errors import ConstraintViolation, DatabaseBusy, SQLError, StorageError
from alkpubsub.storage import Store, Stores, open_store
from alkpubsub.storage.sqlerrors import translate


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = open_store(tmp_path / "app.db")
    with store.transaction() as tx:
        tx.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, ref TEXT UNIQUE)")
    return store


def count(store: Store, sql: str, params: list[object] | None = None) -> int:
    return int(store.honker.query(sql, params or [])[0]["n"])


# -- hangs: run in a child with a deadline -----------------------------------

PRELUDE = """
import asyncio, sys, threading
import alkpubsub
from alkpubsub.storage import open_store
"""

CHILDREN = {
    # A plain thread (no loop) writes through honker while the loop's
    # transaction is open and the loop keeps issuing statements.
    "thread": """
async def main(path):
    store = open_store(path)
    async with store.atransaction() as tx:
        await tx.execute("INSERT INTO orders (ref) VALUES ('a')")
        t = threading.Thread(target=lambda: store.honker.queue("q").enqueue({"n": 1}))
        t.start()
        await asyncio.sleep(0.3)
        await tx.execute("INSERT INTO orders (ref) VALUES ('b')")
    await asyncio.to_thread(t.join)
    print("ok", flush=True)
""",
    # A second event loop in another thread does the same.
    "second-loop": """
async def other(store):
    store.honker.queue("q").enqueue({"n": 1})

async def main(path):
    store = open_store(path)
    async with store.atransaction() as tx:
        await tx.execute("INSERT INTO orders (ref) VALUES ('a')")
        t = threading.Thread(target=lambda: asyncio.run(other(store)))
        t.start()
        await asyncio.sleep(0.3)
        await tx.execute("INSERT INTO orders (ref) VALUES ('b')")
    await asyncio.to_thread(t.join)
    print("ok", flush=True)
""",
    # A Queue obtained before the transaction, used inside it.
    "queue-before": """
async def main(path):
    store = open_store(path)
    q = store.honker.queue("q")
    async with store.atransaction() as tx:
        await tx.execute("INSERT INTO orders (ref) VALUES ('a')")
        try:
            q.enqueue({"n": 1})
        except alkpubsub.TransactionOpen:
            print("refused", flush=True)
    print("ok", flush=True)
""",
    "stream-publish": """
async def main(path):
    store = open_store(path)
    async with store.atransaction() as tx:
        await tx.execute("INSERT INTO orders (ref) VALUES ('a')")
        try:
            store.honker.stream("s").publish({"n": 1})
        except alkpubsub.TransactionOpen:
            print("refused", flush=True)
    print("ok", flush=True)
""",
    "honker-transaction": """
async def main(path):
    store = open_store(path)
    async with store.atransaction() as tx:
        await tx.execute("INSERT INTO orders (ref) VALUES ('a')")
        try:
            with store.honker.transaction() as htx:
                htx.execute("INSERT INTO orders (ref) VALUES ('x')")
        except alkpubsub.TransactionOpen:
            print("refused", flush=True)
    print("ok", flush=True)
""",
    # The raw Database reachable through an attribute the proxy leaves unguarded.
    "queue-db-attr": """
async def main(path):
    store = open_store(path)
    q = store.honker.queue("q")
    raw = getattr(q, "db", None) or getattr(q, "_db", None)
    async with store.atransaction() as tx:
        await tx.execute("INSERT INTO orders (ref) VALUES ('a')")
        try:
            if raw is not None:
                raw.queue("q").enqueue({"n": 1})
        except alkpubsub.TransactionOpen:
            print("refused", flush=True)
    print("ok", flush=True)
""",
    # tx=None passed positionally (honker's enqueue(payload, tx=None, ...)).
    "positional-none": """
async def main(path):
    store = open_store(path)
    async with store.atransaction() as tx:
        await tx.execute("INSERT INTO orders (ref) VALUES ('a')")
        try:
            store.honker.queue("q").enqueue({"n": 1}, None)
        except alkpubsub.TransactionOpen:
            print("refused", flush=True)
    print("ok", flush=True)
""",
    "listen": """
async def main(path):
    store = open_store(path)
    async with store.atransaction() as tx:
        await tx.execute("INSERT INTO orders (ref) VALUES ('a')")
        try:
            store.honker.listen("chan")
        except alkpubsub.TransactionOpen:
            print("refused", flush=True)
        except Exception as exc:
            print("error", type(exc).__name__, flush=True)
    print("ok", flush=True)
""",
}

RUN = """
asyncio.run(main(sys.argv[1]))
"""


async def run_child(path: str, body: str, deadline: float = 8) -> list[str]:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PRELUDE + body + RUN,
        path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(child.communicate(), deadline)
    except TimeoutError:
        child.kill()
        await child.wait()
        pytest.fail("the process hung")
    assert child.returncode == 0, err.decode()[-2000:]
    return out.decode().splitlines()


@pytest.mark.parametrize("case", ["thread", "second-loop"])
async def test_a_honker_write_from_another_thread_waits_then_runs_not_hangs(
    store: Store, case: str
) -> None:
    assert await run_child(store.path, CHILDREN[case]) == ["ok"]
    assert count(store, "SELECT COUNT(*) AS n FROM orders") == 2
    assert count(store, "SELECT COUNT(*) AS n FROM _honker_live WHERE queue = 'q'") == 1


@pytest.mark.parametrize(
    "case",
    ["queue-before", "stream-publish", "honker-transaction", "positional-none", "queue-db-attr"],
)
async def test_other_routes_to_a_honker_write_on_the_loop_are_refused(
    store: Store, case: str
) -> None:
    assert await run_child(store.path, CHILDREN[case]) == ["refused", "ok"]


async def test_honker_listen_during_an_async_transaction_does_not_hang(store: Store) -> None:
    lines = await run_child(store.path, CHILDREN["listen"])
    assert lines[-1] == "ok"


# -- typed SQL errors ---------------------------------------------------------


def test_a_unique_violation_does_not_leak_the_parameters(store: Store) -> None:
    with store.transaction() as tx:
        tx.execute("INSERT INTO orders (ref) VALUES (?)", ["s3cret-UNIQUE constraint failed: x.y"])
    with pytest.raises(ConstraintViolation) as info, store.transaction() as tx:
        tx.execute("INSERT INTO orders (ref) VALUES (?)", ["s3cret-UNIQUE constraint failed: x.y"])
    exc = info.value
    assert "s3cret" not in str(exc) and "s3cret" not in repr(exc)
    assert (exc.kind, exc.table, exc.columns) == ("UNIQUE", "orders", ("ref",))


def test_a_multi_column_unique_names_both_columns(store: Store) -> None:
    with store.transaction() as tx:
        tx.execute("CREATE TABLE pairs (a TEXT, b TEXT, UNIQUE (a, b))")
        tx.execute("INSERT INTO pairs VALUES ('1', '2')")
    with pytest.raises(ConstraintViolation) as info, store.transaction() as tx:
        tx.execute("INSERT INTO pairs VALUES ('1', '2')")
    assert (info.value.table, info.value.columns) == ("pairs", ("a", "b"))


def test_a_table_name_with_a_dot_is_named_whole(store: Store) -> None:
    with store.transaction() as tx:
        tx.execute('CREATE TABLE "shop.orders" (ref TEXT UNIQUE)')
        tx.execute("INSERT INTO \"shop.orders\" VALUES ('r')")
    with pytest.raises(ConstraintViolation) as info, store.transaction() as tx:
        tx.execute("INSERT INTO \"shop.orders\" VALUES ('r')")
    # SQLite says "UNIQUE constraint failed: shop.orders.ref".
    assert (info.value.table, info.value.columns) == ("shop.orders", ("ref",))


def test_a_table_named_like_busy_is_an_sql_error_not_database_busy(store: Store) -> None:
    with pytest.raises(StorageError) as info, store.transaction() as tx:
        tx.execute("SELECT * FROM busybox_jobs")
    assert type(info.value) is SQLError, type(info.value)
    assert not isinstance(info.value, DatabaseBusy)


def test_a_quoted_table_name_and_foreign_key_message_translate() -> None:
    fk = translate("FOREIGN KEY constraint failed", "INSERT INTO child VALUES (1)")
    assert isinstance(fk, ConstraintViolation)
    assert (fk.kind, fk.table, fk.columns) == ("FOREIGN KEY", None, ())
    weird = translate('UNIQUE constraint failed: we"ird.c', 'INSERT INTO "we""ird" VALUES (1)')
    assert isinstance(weird, ConstraintViolation) and weird.table == 'we"ird'


async def test_a_failed_statement_in_an_async_transaction_commits_nothing(store: Store) -> None:
    with pytest.raises(ConstraintViolation):
        async with store.atransaction() as tx:
            await tx.execute("INSERT INTO orders (ref) VALUES ('one')")
            await tx.enqueue("q", {"n": 1})
            await tx.execute("INSERT INTO orders (ref) VALUES ('one')")
    assert count(store, "SELECT COUNT(*) AS n FROM orders") == 0
    assert count(store, "SELECT COUNT(*) AS n FROM _honker_live WHERE queue = 'q'") == 0


# -- enqueue, locks, schedule: argument checks --------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay": 1e300},
        {"run_at": 1e300},
        {"expires": 1e300},
        {"priority": 2**63},
        {"max_attempts": 2**63},
        {"delay": float("nan")},
        {"priority": 1.5},
    ],
)
def test_enqueue_out_of_range_arguments_are_config_errors(store: Store, kwargs: dict) -> None:
    with pytest.raises(ConfigError), store.transaction() as tx:
        tx.execute("INSERT INTO orders (ref) VALUES ('x')")
        tx.enqueue("q", {"n": 1}, **kwargs)
    assert count(store, "SELECT COUNT(*) AS n FROM orders") == 0


def test_an_oversized_or_unencodable_payload_is_refused_and_nothing_commits(store: Store) -> None:
    # tx.publish refuses more than MAX_PAYLOAD_BYTES (1 MB); a job should too.
    for payload in ({"s": {1, 2}}, "x" * (2 << 20)):
        with pytest.raises(PayloadError), store.transaction() as tx:
            tx.execute("INSERT INTO orders (ref) VALUES ('x')")
            tx.enqueue("q", payload)
    assert count(store, "SELECT COUNT(*) AS n FROM orders") == 0
    assert count(store, "SELECT COUNT(*) AS n FROM _honker_live") == 0


@pytest.mark.parametrize("ttl", [0, -1, 1.5, True, 2**63, 10**30])
def test_bad_lock_ttls_are_config_errors(store: Store, ttl: object) -> None:
    with pytest.raises(ConfigError), store.transaction() as tx:
        tx.acquire_lock("l", owner="me", ttl=ttl)  # type: ignore[arg-type]


def test_a_huge_but_valid_int_ttl_locks(store: Store) -> None:
    with store.transaction() as tx:
        assert tx.acquire_lock("l", owner="me", ttl=10**9)
        assert not tx.acquire_lock("l", owner="other", ttl=5)
        assert tx.renew_lock("l", owner="me", ttl=10**9)
        tx.release_lock("l", owner="me")
        assert tx.acquire_lock("l", owner="other", ttl=5)


@pytest.mark.parametrize(
    "cron", ["* * *", "61 * * * *", "", None, "@every", "@every -5s", "@every 0s", 5]
)
def test_bad_crons_are_config_errors_and_nothing_commits(store: Store, cron: object) -> None:
    with pytest.raises(ConfigError), store.transaction() as tx:
        tx.execute("INSERT INTO orders (ref) VALUES ('x')")
        tx.schedule("s", queue="q", cron=cron)  # type: ignore[arg-type]
    assert count(store, "SELECT COUNT(*) AS n FROM orders") == 0


async def test_many_concurrent_async_transactions_enqueue_every_job(store: Store) -> None:
    async def one(i: int) -> int:
        async with store.atransaction() as tx:
            await tx.execute("INSERT INTO orders (ref) VALUES (?)", [f"r{i}"])
            first = await tx.enqueue("q", {"i": i})
            await asyncio.sleep(0)
            await tx.enqueue("q", {"i": i, "second": True})
            return first

    ids = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(40))), 20)
    assert len(set(ids)) == 40
    assert count(store, "SELECT COUNT(*) AS n FROM orders") == 40
    assert count(store, "SELECT COUNT(*) AS n FROM _honker_live WHERE queue = 'q'") == 80


# -- ack=saved -----------------------------------------------------------------


async def test_saved_ack_after_a_dead_letter_covers_the_position(tmp_path: Path) -> None:
    url = f"honker+durable://{tmp_path / 'a.db'}?ack=saved&max_deliveries=1"
    transport = await alkpubsub.connect(url)
    await transport.publish_many([("orders:x", i) for i in range(2)])
    async with transport.subscribe("orders:>", consumer="c", start="earliest") as sub:
        first = await sub.get(timeout=5)
        second = await sub.get(timeout=5)
        await asyncio.wait_for(sub.nack(first), 5)  # dead-lettered at once
        await asyncio.wait_for(sub.ack(second), 5)
        # (the dead letter itself is appended to the stream, skipped by the pattern)
        assert sub.saved_position >= second.offset  # type: ignore[attr-defined]
    async with transport.subscribe("orders:>", consumer="c", start="earliest") as sub:
        with pytest.raises(TimeoutError):
            await sub.get(timeout=0.5)
    await transport.close()


async def test_close_while_a_saved_ack_waits_neither_hangs_nor_lies(tmp_path: Path) -> None:
    url = f"honker+durable://{tmp_path / 'a.db'}?ack=saved"
    transport = await alkpubsub.connect(url)
    await transport.publish_many([("orders:x", i) for i in range(50)])
    sub = transport.subscribe("orders:>", consumer="c", start="earliest")
    await sub.__aenter__()
    events = [await sub.get(timeout=5) for _ in range(50)]
    acks = [asyncio.create_task(sub.ack(e)) for e in events]
    await asyncio.sleep(0)
    await asyncio.wait_for(sub.__aexit__(None, None, None), 5)
    done = await asyncio.wait_for(asyncio.gather(*acks, return_exceptions=True), 5)
    await transport.close()
    returned = [e for e, r in zip(events, done, strict=True) if r is None]
    again = await alkpubsub.connect(url)
    async with again.subscribe("orders:>", consumer="c", start="earliest") as sub2:
        first = await sub2.get(timeout=2) if len(returned) < 50 else None
    await again.close()
    if first is not None:
        assert first.offset > max(e.offset for e in returned)


# -- tenants -------------------------------------------------------------------


@pytest.mark.parametrize(
    "tenant", ["%2E%2E", "a%2Fb", "%2Fetc", "%C3%A1cme", "acme%00", "acme%0A", ".", "-x"]
)
async def test_encoded_and_odd_tenants_are_refused(tmp_path: Path, tenant: str) -> None:
    with pytest.raises(ConfigError):
        await alkpubsub.connect(f"honker+durable://{tmp_path}?tenant={tenant}")
    assert await asyncio.to_thread(lambda: list(tmp_path.iterdir())) == []


async def test_a_root_with_a_trailing_slash_works_with_a_tenant(tmp_path: Path) -> None:
    transport = await alkpubsub.connect(f"honker+durable://{tmp_path}/?tenant=acme")
    await transport.publish("a:b", 1)
    await transport.close()
    assert (tmp_path / "tenant-acme.db").exists()


async def test_a_tenant_with_a_root_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    db.write_bytes(b"")
    with pytest.raises(ConfigError):
        await alkpubsub.connect(f"honker+durable://{db}?tenant=acme")


async def test_an_empty_tenant_option_is_refused_not_ignored(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with pytest.raises(ConfigError):
        await alkpubsub.connect(f"honker+durable://{root}?tenant=")
    assert not root.exists()


async def test_stores_url_round_trips_an_odd_root(tmp_path: Path) -> None:
    root = tmp_path / "my data %41 ?#&x"
    with Stores(root) as stores:
        with stores.tenant("acme").transaction() as tx:
            sent = tx.publish("orders:created", {"ref": 1})
        transport = await alkpubsub.connect(stores.url("acme"))
        async with transport.subscribe("orders:>", start="earliest") as sub:
            got = await sub.get(timeout=5)
        await transport.close()
    assert got.id == sent.id
    assert sorted(p.name for p in root.iterdir() if p.suffix == ".db") == ["tenant-acme.db"]


async def test_a_saved_ack_whose_save_fails_raises_and_is_redelivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alkpubsub.storage.consumers import ConsumerLease

    url = f"honker+durable://{tmp_path / 'a.db'}?ack=saved"
    transport = await alkpubsub.connect(url)
    await transport.publish_many([("orders:x", i) for i in range(2)])
    real = ConsumerLease.save
    failing = {"on": True}

    async def save(self: ConsumerLease, offset: int) -> None:
        if failing["on"]:
            raise OSError("disk full")
        await real(self, offset)

    monkeypatch.setattr(ConsumerLease, "save", save)
    monkeypatch.setattr(ConsumerLease, "release", lambda self, offset: asyncio.sleep(0))
    async with transport.subscribe("orders:>", consumer="c", start="earliest") as sub:
        first = await sub.get(timeout=5)
        with pytest.raises(alkpubsub.ConnectionLost):
            await asyncio.wait_for(sub.ack(first), 5)
        assert sub.saved_position < first.offset  # type: ignore[attr-defined]
        failing["on"] = False
        second = await sub.get(timeout=5)
        await asyncio.wait_for(sub.ack(second), 5)
        assert sub.saved_position == second.offset  # type: ignore[attr-defined]
    await transport.close()
