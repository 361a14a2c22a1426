"""A user's own SQL errors in a store transaction are typed StorageErrors, and
the transaction they leave rolls back, events included."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_storage import hold_write_lock

import alkpubsub
from alkpubsub import ConstraintViolation, DatabaseBusy, PublishError, SQLError, StorageError
from alkpubsub.conformance import nothing_more
from alkpubsub.storage import Store, open_store

SCHEMA = (
    "CREATE TABLE shops (id INTEGER PRIMARY KEY)",
    "CREATE TABLE orders (id INTEGER PRIMARY KEY, ref TEXT NOT NULL UNIQUE,"
    " qty INTEGER CONSTRAINT qty_positive CHECK (qty > 0),"
    " shop INTEGER REFERENCES shops(id))",
)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = open_store(tmp_path / "app.db")
    with store.transaction() as tx:
        for sql in SCHEMA:
            tx.execute(sql)
        tx.execute("INSERT INTO orders (ref, qty) VALUES ('o-1', 1)")
    return store


def rows(store: Store) -> int:
    return int(store.honker.query("SELECT COUNT(*) AS n FROM orders")[0]["n"])


@pytest.mark.parametrize(
    ("sql", "error", "kind", "table", "columns"),
    [
        ("INSERT INTO orders (ref, qty) VALUES ('o-1', 2)", ConstraintViolation, "UNIQUE",
         "orders", ("ref",)),
        ("INSERT INTO orders (ref, qty) VALUES (NULL, 2)", ConstraintViolation, "NOT NULL",
         "orders", ("ref",)),
        ("INSERT INTO orders (ref, qty) VALUES ('o-2', 0)", ConstraintViolation, "CHECK",
         None, ()),
        ("INSERT INTO orders (id, ref, qty) VALUES (1, 'o-3', 1)", ConstraintViolation,
         "UNIQUE", "orders", ("id",)),
        ("INSRT INTO orders VALUES (1)", SQLError, None, None, ()),
        ("INSERT INTO nowhere (x) VALUES (1)", SQLError, None, None, ()),
        ("INSERT INTO orders (nope) VALUES (1)", SQLError, None, None, ()),
    ],
)  # fmt: skip
async def test_sql_errors_are_typed_and_nothing_of_the_transaction_is_committed(
    store: Store,
    sql: str,
    error: type[StorageError],
    kind: str | None,
    table: str | None,
    columns: tuple[str, ...],
) -> None:
    durable = await alkpubsub.connect(f"honker+durable://{store.path}")
    async with durable.subscribe("orders:>") as sub:
        before = rows(store)
        with pytest.raises(error) as raised, store.transaction() as tx:
            tx.execute("INSERT INTO orders (ref, qty) VALUES ('kept-until-rollback', 5)")
            tx.publish("orders:created", {"ref": "kept-until-rollback"})
            tx.execute(sql, ())
        exc = raised.value
        assert isinstance(exc, StorageError) and isinstance(exc, alkpubsub.PubSubError)
        assert exc.statement == sql and exc.sqlite_message
        if isinstance(exc, ConstraintViolation):
            assert (exc.kind, exc.table, exc.columns) == (kind, table, columns)
            if table:
                assert f"{table}({', '.join(columns)})" in str(exc)
        assert rows(store) == before  # the first INSERT rolled back too
        await nothing_more(sub)  # and its event was never committed
    await durable.close()


async def test_the_async_transaction_raises_the_same_types(store: Store) -> None:
    with pytest.raises(ConstraintViolation, match="UNIQUE constraint failed on orders"):
        async with store.atransaction() as tx:
            await tx.publish("orders:created", {"ref": "o-1"})
            await tx.execute("INSERT INTO orders (ref, qty) VALUES (?, ?)", ("o-1", 3))
    with pytest.raises(SQLError, match="no such table"):
        async with store.atransaction() as tx:
            await tx.query("SELECT * FROM nowhere")
    assert rows(store) == 1
    assert store.stream_head("events") == 0


def test_parameters_never_appear_in_the_error(store: Store) -> None:
    with pytest.raises(ConstraintViolation) as raised, store.transaction() as tx:
        tx.execute("INSERT INTO orders (ref, qty) VALUES (?, ?)", ("o-1", "secret-token-123"))
    assert "secret-token-123" not in str(raised.value)
    assert "secret-token-123" not in repr(raised.value)


def test_a_caught_error_leaves_the_transaction_usable(store: Store) -> None:
    # SQLite fails the statement, not the transaction: a caller may go on.
    with store.transaction() as tx:
        with pytest.raises(ConstraintViolation):
            tx.execute("INSERT INTO orders (ref, qty) VALUES ('o-1', 1)")
        tx.execute("INSERT INTO orders (ref, qty) VALUES ('o-2', 1)")
    assert rows(store) == 2


async def test_a_locked_database_past_busy_timeout_is_database_busy(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.db")
    with open_store(path) as setup, setup.transaction() as tx:
        tx.execute("CREATE TABLE t (x INTEGER)")
        tx.execute("CREATE TABLE nodes (id INTEGER PRIMARY KEY, key TEXT)")  # the child writes it
    impatient = open_store(path, busy_timeout=0.2)
    child = await hold_write_lock(path, 1.5)
    try:
        with pytest.raises(DatabaseBusy, match="busy_timeout") as raised:
            async with impatient.atransaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
        assert isinstance(raised.value, PublishError)  # what a publish raised before
    finally:
        impatient.close()
        await child.wait()
    with open_store(path) as check:
        assert check.honker.query("SELECT COUNT(*) AS n FROM t")[0]["n"] == 0
