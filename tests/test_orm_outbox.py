"""SQLAlchemy ORM/Core over the Honker dialect: rows, events and jobs commit
and roll back together, seen from another process (examples/orm_outbox.py)."""

from __future__ import annotations

import asyncio
import datetime
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import alkpubsub
from alkpubsub.storage import Store, open_store
from alkpubsub.storage.sqlalchemy import (
    async_store_transaction,
    create_async_engine,
    create_engine,
    store_transaction,
)

ROOT = Path(__file__).resolve().parent.parent


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    ref: Mapped[str] = mapped_column(String(32), unique=True)
    data: Mapped[Any] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime.datetime] = mapped_column(
        DateTime, default=lambda: datetime.datetime(2024, 1, 1)
    )


# A durable consumer in another process: "next <seconds>" on stdin answers one
# JSON line, the next event ({"topic", "payload"}) or null if none came in time.
CONSUMER = """
import asyncio, json, sys
import alkpubsub

async def main():
    transport = await alkpubsub.connect("honker+durable://" + sys.argv[1])
    loop = asyncio.get_running_loop()
    async with transport.subscribe("orders:*", consumer="audit", start="earliest") as sub:
        print("ready", flush=True)
        while (line := await loop.run_in_executor(None, sys.stdin.readline)).startswith("next"):
            try:
                event = await sub.get(timeout=float(line.split()[1]))
            except TimeoutError:
                print("null", flush=True)
                continue
            print(json.dumps({"topic": event.topic, "payload": event.payload}), flush=True)
            await sub.ack(event)
    await transport.close()

asyncio.run(main())
"""

# honker's own queue API in another process: claim every ready job of a queue.
WORKER = """
import json, sys, honker
db = honker.open(sys.argv[1])
jobs = db.queue(sys.argv[2]).claim_batch("worker-1", 100)
print(json.dumps([job.payload for job in jobs]))
for job in jobs:
    job.ack()
"""


class ConsumerProcess:
    def __init__(self, db: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", CONSUMER, str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._line() == "ready"

    def next(self, seconds: float) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(f"next {seconds}\n")
        self.process.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        try:
            self.process.wait(timeout=15)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=5)

    def _line(self) -> str:
        # Every command has its own bound inside the child (sub.get(timeout=));
        # a dead child ends the read with EOF.
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=15)
            assert self.process.stderr is not None
            raise AssertionError(f"the consumer exited: {self.process.stderr.read()}")
        return line.strip()


def claim_in_other_process(db: Path, queue: str) -> list[Any]:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(db), queue],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    jobs: list[Any] = json.loads(done.stdout)
    return jobs


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "shop.db"


@pytest.fixture
def engine(db: Path) -> Iterator[Engine]:
    engine = create_engine(db)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def store(db: Path, engine: Engine) -> Iterator[Store]:
    store = open_store(db)  # the same per-process handle the engine's connections share
    yield store
    store.close()


@pytest.fixture
async def aengine(db: Path, engine: Engine) -> AsyncIterator[AsyncEngine]:
    aengine = create_async_engine(db)
    yield aengine
    await aengine.dispose()


@pytest.fixture
def consumer(db: Path, engine: Engine) -> Iterator[ConsumerProcess]:
    process = ConsumerProcess(db)
    yield process
    process.close()


def count(store: Store, sql: str) -> int:
    return int(store.honker.query(sql, [])[0]["n"])


def stream_payloads(store: Store) -> list[Any]:
    rows = store.honker.query("SELECT payload FROM _honker_stream ORDER BY offset", [])
    return [json.loads(row["payload"])["payload"] for row in rows]


# -- the example ----------------------------------------------------------------


def test_example_runs_and_prints_what_its_docs_promise() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "orm_outbox.py")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "before commit, the consumer sees: nothing",
        "after commit, the consumer sees: orders:created {'ref': 'A-1'}",
        "after rollback: 0 A-2 rows, 1 events, 1 jobs in the file",
        "after the async commit, the consumer sees: orders:created {'ref': 'A-3'}",
        "orders in the file: A-1, A-3",
        "receipt jobs to send: A-1, A-3",
    ]


# -- commit and rollback, seen from another process --------------------------------


def test_consumer_sees_nothing_while_flushed_session_is_open_then_exactly_the_commit(
    engine: Engine, consumer: ConsumerProcess
) -> None:
    with Session(engine) as session:
        session.add(Order(ref="A-1"))
        session.flush()  # the INSERT ran in the session's write transaction
        tx = store_transaction(session)
        event = tx.publish("orders:created", {"ref": "A-1"})
        assert event.offset == 1
        # The session sees its own row; another connection of this process and
        # the consumer process see the committed state: nothing.
        assert session.scalar(select(func.count()).select_from(Order)) == 1
        with engine.connect() as other:
            assert other.scalar(select(func.count()).select_from(Order)) == 0
            assert other.scalar(text("SELECT count(*) FROM _honker_stream")) == 0
        assert consumer.next(0.5) is None
        session.commit()
    assert consumer.next(10) == {"topic": "orders:created", "payload": {"ref": "A-1"}}
    assert consumer.next(0.3) is None  # exactly one event


def test_rollback_leaves_no_row_no_event_no_job(engine: Engine, store: Store, db: Path) -> None:
    with Session(engine) as session:
        session.add(Order(ref="R-1"))
        session.flush()
        tx = store_transaction(session)
        tx.publish("orders:created", {"ref": "R-1"})
        tx.enqueue("send-receipt", {"ref": "R-1"})
        # inside the transaction all three exist
        assert tx.query("SELECT count(*) AS n FROM _honker_live")[0]["n"] == 1
        assert tx.query("SELECT count(*) AS n FROM _honker_stream")[0]["n"] == 1
        session.rollback()

        # the same session goes on with a new transaction, which commits
        session.add(Order(ref="C-1"))
        tx = store_transaction(session)
        tx.publish("orders:created", {"ref": "C-1"})
        tx.enqueue("send-receipt", {"ref": "C-1"})
        session.commit()

    assert [row["ref"] for row in store.honker.query("SELECT ref FROM orders", [])] == ["C-1"]
    assert stream_payloads(store) == [{"ref": "C-1"}]
    assert count(store, "SELECT count(*) AS n FROM _honker_live") == 1
    # honker's own queue API, in another process, claims only the committed job
    assert claim_in_other_process(db, "send-receipt") == [{"ref": "C-1"}]


def test_duplicate_ref_raises_integrity_error_and_takes_its_event_with_it(
    engine: Engine, store: Store
) -> None:
    with Session(engine) as session:
        session.add(Order(ref="D-1"))
        session.commit()
        session.add(Order(ref="D-1"))
        store_transaction(session).publish("orders:created", {"ref": "D-1", "again": True})
        with pytest.raises(IntegrityError) as caught:
            session.commit()
        session.rollback()
    violation = caught.value.orig.__cause__ if caught.value.orig is not None else None
    assert isinstance(violation, alkpubsub.ConstraintViolation)
    assert (violation.kind, violation.table, violation.columns) == ("UNIQUE", "orders", ("ref",))
    assert count(store, "SELECT count(*) AS n FROM orders") == 1
    assert count(store, "SELECT count(*) AS n FROM _honker_stream") == 0


def test_rolled_back_savepoint_drops_its_row_and_event_outer_commit_keeps_its_own(
    engine: Engine, store: Store
) -> None:
    with Session(engine) as session:
        session.add(Order(ref="outer"))
        store_transaction(session).publish("orders:created", {"ref": "outer"})

        nested = session.begin_nested()
        session.add(Order(ref="dropped"))
        session.flush()
        store_transaction(session).publish("orders:created", {"ref": "dropped"})
        nested.rollback()

        with session.begin_nested():  # a savepoint that is released keeps its work
            session.add(Order(ref="kept"))
            store_transaction(session).publish("orders:created", {"ref": "kept"})
        session.commit()

    refs = [row["ref"] for row in store.honker.query("SELECT ref FROM orders ORDER BY id", [])]
    assert refs == ["outer", "kept"]
    assert stream_payloads(store) == [{"ref": "outer"}, {"ref": "kept"}]


async def test_sync_session_driven_from_worker_threads_commits_and_frees_the_writer(
    engine: Engine, store: Store
) -> None:
    # As Starlette/FastAPI run a sync endpoint and its dependency's teardown:
    # each step in a worker thread, in its own copy of the context, so the
    # write begins in one context and commits in another.
    session = Session(engine)
    await asyncio.to_thread(session.add, Order(ref="T-1"))
    await asyncio.to_thread(session.flush)
    await asyncio.to_thread(lambda: store_transaction(session).publish("orders:created", {}))
    await asyncio.wait_for(asyncio.to_thread(session.commit), 10)
    await asyncio.to_thread(session.close)

    def next_write() -> None:  # the store's writer is free again
        with Session(engine) as later:
            later.add(Order(ref="T-2"))
            later.commit()

    await asyncio.wait_for(asyncio.to_thread(next_write), 10)
    refs = [row["ref"] for row in store.honker.query("SELECT ref FROM orders ORDER BY id", [])]
    assert refs == ["T-1", "T-2"]
    assert count(store, "SELECT count(*) AS n FROM _honker_stream") == 1


# -- what the driver reports: primary keys, RETURNING, rowcount -----------------------


def test_orm_insert_gets_its_primary_key_and_returning_returns_rows(engine: Engine) -> None:
    with Session(engine) as session:
        first, second = Order(ref="P-1"), Order(ref="P-2")
        session.add_all([first, second])
        session.flush()
        assert (first.id, second.id) == (1, 2)
        single = session.execute(
            insert(Order).values(ref="P-3").returning(Order.id, Order.ref)
        ).all()
        assert [tuple(row) for row in single] == [(3, "P-3")]
        many = session.execute(
            insert(Order).returning(Order.id, Order.ref, sort_by_parameter_order=True),
            [{"ref": "P-4"}, {"ref": "P-5"}],
        ).all()
        assert [tuple(row) for row in many] == [(4, "P-4"), (5, "P-5")]
        updated = session.execute(
            update(Order).where(Order.id > 3).values(data={"x": 1}).returning(Order.ref)
        ).scalars()
        assert sorted(updated) == ["P-4", "P-5"]
        session.commit()
    with engine.connect() as connection:
        ids = connection.execute(select(Order.id, Order.ref).order_by(Order.id)).all()
    assert [tuple(row) for row in ids] == [(i, f"P-{i}") for i in range(1, 6)]


def test_lastrowid_and_rowcount_without_returning(engine: Engine) -> None:
    notes = Table(
        "notes",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("body", String),
        implicit_returning=False,  # the primary key comes from cursor.lastrowid
    )
    notes.create(engine)
    with engine.begin() as connection:
        connection.execute(notes.insert().values(id=41, body="seed"))
        result = connection.execute(notes.insert().values(body="a"))
        assert result.inserted_primary_key == (42,)
        assert result.lastrowid == 42
        changed = connection.execute(notes.update().values(body="b"))
        assert changed.rowcount == 2
    with engine.connect() as connection:
        assert connection.execute(select(notes.c.body)).scalars().all() == ["b", "b"]


# -- types ---------------------------------------------------------------------------


def test_json_and_datetime_round_trip(engine: Engine) -> None:
    data = {"lines": [{"sku": "tea", "qty": 2, "price": 3.25}], "note": "thé ☕", "gift": None}
    when = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456)
    with Session(engine) as session:
        session.add(Order(ref="T-1", data=data, created_at=when))
        session.add(
            Order(ref="T-2", data=[1, "two", False], created_at=datetime.datetime(2001, 1, 1))
        )
        session.commit()
    with Session(engine) as session:  # a new session: values come from the file
        order = session.scalars(select(Order).where(Order.ref == "T-1")).one()
        assert order.data == data
        assert order.created_at == when
        assert session.scalar(select(Order.data).where(Order.ref == "T-2")) == [1, "two", False]
        # SQL on the stored forms: JSON paths and DateTime comparisons
        qty = session.scalar(select(Order.data["lines"][0]["qty"].as_integer()))
        assert qty == 2
        later = session.scalars(
            select(Order.ref).where(Order.created_at > datetime.datetime(2024, 1, 1))
        )
        assert later.all() == ["T-1"]
        stored = session.scalar(text("SELECT created_at FROM orders WHERE ref = 'T-1'"))
        assert stored == "2024-02-29 23:59:58.123456"


# -- async ---------------------------------------------------------------------------


async def test_async_session_commit_makes_row_and_event_visible(
    aengine: AsyncEngine, store: Store, db: Path
) -> None:
    transport = await alkpubsub.connect(f"honker+durable://{db}")
    try:
        async with transport.subscribe("orders:*", consumer="async", start="earliest") as sub:
            async with AsyncSession(aengine) as session:
                session.add(Order(ref="S-1", data={"n": 1}))
                tx = await async_store_transaction(session)
                await tx.publish("orders:created", {"ref": "S-1"})
                await tx.enqueue("send-receipt", {"ref": "S-1"})
                with pytest.raises(TimeoutError):
                    await sub.get(timeout=0.3)  # not committed yet
                await session.commit()
            event = await sub.get(timeout=10)
            assert (event.topic, event.payload) == ("orders:created", {"ref": "S-1"})
            await sub.ack(event)
    finally:
        await transport.close()
    async with AsyncSession(aengine) as session:
        order = (await session.scalars(select(Order))).one()
        assert (order.ref, order.data) == ("S-1", {"n": 1})
    assert count(store, "SELECT count(*) AS n FROM _honker_live") == 1


async def test_async_session_rollback_leaves_nothing(aengine: AsyncEngine, store: Store) -> None:
    async with AsyncSession(aengine) as session:
        session.add(Order(ref="S-2"))
        await session.flush()
        tx = await async_store_transaction(session)
        await tx.publish("orders:created", {"ref": "S-2"})
        await tx.enqueue("send-receipt", {"ref": "S-2"})
        assert (await tx.query("SELECT count(*) AS n FROM orders"))[0]["n"] == 1
        await session.rollback()
    assert count(store, "SELECT count(*) AS n FROM orders") == 0
    assert count(store, "SELECT count(*) AS n FROM _honker_stream") == 0
    assert count(store, "SELECT count(*) AS n FROM _honker_live") == 0


async def test_async_commit_waiting_for_another_writer_does_not_block_the_loop(
    aengine: AsyncEngine, store: Store
) -> None:
    async with AsyncSession(aengine) as warm:  # first connect and dialect setup, done before
        assert await warm.scalar(text("SELECT 1")) == 1

    holding = threading.Event()
    hold = 0.5

    def other_writer() -> None:
        with store.transaction() as tx:
            tx.execute("INSERT INTO orders (ref, data, created_at) VALUES ('W-1', '{}', '2024')")
            holding.set()
            time.sleep(hold)  # what is measured: a writer holding the file this long

    writer = threading.Thread(target=other_writer)
    writer.start()
    assert await asyncio.to_thread(holding.wait, 5)

    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    async with AsyncSession(aengine) as session:
        session.add(Order(ref="S-3"))
        tx = await async_store_transaction(session)  # waits for the other writer
        await tx.publish("orders:created", {"ref": "S-3"})
        await session.commit()
    waited = time.monotonic() - started
    stop.set()
    await asyncio.wait_for(ticker, 5)
    await asyncio.to_thread(writer.join, 5)
    assert not writer.is_alive()

    assert waited >= hold * 0.6, "the commit did not wait for the other writer"
    assert len(gaps) >= 10
    assert max(gaps) < 0.15, f"the loop stalled for {max(gaps):.3f} s"
    refs = [row["ref"] for row in store.honker.query("SELECT ref FROM orders ORDER BY id", [])]
    assert refs == ["W-1", "S-3"]
    assert stream_payloads(store) == [{"ref": "S-3"}]


async def test_async_connection_core_statements_return_rows(
    aengine: AsyncEngine, store: Store
) -> None:
    # Core through AsyncConnection (not only the ORM's buffered results): the
    # result of a statement with rows is awaited by SQLAlchemy's asyncio layer.
    async with aengine.begin() as connection:
        await connection.execute(insert(Order).values(ref="K-1"))
        returned = await connection.execute(insert(Order).values(ref="K-2").returning(Order.id))
        assert [tuple(row) for row in returned.all()] == [(2,)]
        refs = await connection.execute(select(Order.ref).order_by(Order.id))
        assert refs.scalars().all() == ["K-1", "K-2"]
    assert count(store, "SELECT count(*) AS n FROM orders") == 2
