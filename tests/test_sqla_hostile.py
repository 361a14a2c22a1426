"""Hostile review of the SQLAlchemy dialect over a Honker store
(storage/sqla_dbapi.py, storage/sqla_dialect.py, storage/sqlalchemy.py).

Each test asserts the promised behaviour; a failing test is a broken promise.
Every wait is bounded (thread joins with timeouts, asyncio.timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import gc
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import sqlalchemy as sa
from sqla_helpers import BUSY
from sqla_helpers import bounded as _bounded
from sqla_helpers import db as _db
from sqla_helpers import engine_on as _engine
from sqla_helpers import write_ok as _write_ok
from sqla_helpers import xs as _xs
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import alkpubsub
from alkpubsub.storage.sqlalchemy import (
    async_store_transaction,
    create_async_engine,
    create_engine,
    store_transaction,
)

# -- helpers -------------------------------------------------------------------


def _user_version(engine):
    with engine.connect() as c:
        return c.execute(text("PRAGMA user_version")).scalar()


# -- (4) the read/write classifier --------------------------------------------


def test_pragma_assignment_with_comment_before_equals_is_not_run_on_reader(tmp_path):
    engine = _engine(tmp_path)
    with engine.connect() as c:
        c.execute(text("PRAGMA user_version /* set it */ = 7"))
        # a write must have opened the write transaction...
        assert c.connection.dbapi_connection.in_write_transaction
        c.rollback()
    # ...so the rollback undoes it
    assert _user_version(engine) == 0


def test_pragma_assignment_with_line_comment_before_equals(tmp_path):
    engine = _engine(tmp_path)
    with engine.connect() as c:
        c.execute(text("PRAGMA user_version -- set\n = 9"))
        c.rollback()
    assert _user_version(engine) == 0


@pytest.mark.parametrize(
    "sql",
    [
        "PRAGMA user_version = 3",
        "pragma user_version=3",
        "PRAGMA main.user_version = 3",
        "PRAGMA user_version(3)",
        "PRAGMA user_version /*(*/ = 3",
        "  \n\t -- c\n /* d */ PRAGMA user_version = 3",
    ],
)
def test_pragma_assignments_roll_back(tmp_path, sql):
    engine = _engine(tmp_path)
    with engine.connect() as c:
        c.execute(text(sql))
        c.rollback()
    assert _user_version(engine) == 0


def test_select_calling_a_honker_write_function_runs_in_the_write_transaction(tmp_path):
    # SELECT honker_enqueue(...) writes: it must run in the session's write
    # transaction (and roll back with it), not on the reader pool.
    engine = _engine(tmp_path)
    with Session(engine) as s:
        jid = s.execute(
            text("SELECT honker_enqueue('q', '{}', NULL, NULL, 0, 3, NULL) AS id")
        ).scalar()
        assert jid is not None
        s.rollback()
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM _honker_live")).scalar() == 0


@pytest.mark.parametrize(
    "sql",
    [
        "  \n\n -- lead\n /* block */ insert into t(x) values (1)",
        "with c(v) as (select 1) insert into t(x) select v from c",
        "WITH c(v) AS (VALUES (1)) INSERT INTO t(x) SELECT v FROM c",
        "replace into t(id, x) values (100, 1)",
        "INSERT OR REPLACE INTO t(id, x) VALUES (101, 1)",
        "/* SELECT */ INSERT INTO t(x) VALUES (1)",
        "-- SELECT\nINSERT INTO t(x) VALUES (1)",
    ],
)
def test_disguised_writes_run_in_the_transaction_and_roll_back(tmp_path, sql):
    engine = _engine(tmp_path)
    with engine.connect() as c:
        c.execute(text(sql))
        assert c.connection.dbapi_connection.in_write_transaction
        c.rollback()
    assert _xs(engine) == []


def test_multiple_statements_in_one_string_write_nothing(tmp_path):
    engine = _engine(tmp_path)
    with engine.connect() as c:
        with pytest.raises(sa.exc.DBAPIError):
            c.execute(text("SELECT 1; INSERT INTO t(x) VALUES (99)"))
        c.rollback()
    assert _xs(engine) == []


def test_explain_query_plan_and_reading_pragmas_read(tmp_path):
    engine = _engine(tmp_path)
    with engine.connect() as c:
        rows = c.execute(text("EXPLAIN QUERY PLAN SELECT * FROM t")).all()
        keys = list(c.execute(text("EXPLAIN QUERY PLAN SELECT 1")).keys())
        assert rows and "detail" in keys
        cols = c.execute(text("PRAGMA table_info(t)")).all()
        assert [r[1] for r in cols] == ["id", "x"]
        assert not c.connection.dbapi_connection.in_write_transaction


def test_select_on_table_created_in_open_transaction(tmp_path):
    engine = _engine(tmp_path)
    with engine.connect() as c:
        c.execute(text("CREATE TABLE fresh (a)"))
        c.execute(text("INSERT INTO fresh VALUES (1)"))
        assert c.execute(text("SELECT a FROM fresh")).all() == [(1,)]
        c.rollback()
    with engine.connect() as c, pytest.raises(sa.exc.OperationalError):
        c.execute(text("SELECT a FROM fresh"))


def test_read_after_write_in_session_sees_own_write(tmp_path):
    engine = _engine(tmp_path)
    with Session(engine) as s:
        s.execute(text("INSERT INTO t(x) VALUES (5)"))
        assert s.execute(text("SELECT x FROM t")).scalars().all() == [5]
        s.rollback()


def test_vacuum_and_attach_fail_clearly_and_do_not_wedge(tmp_path):
    engine = _engine(tmp_path)
    for sql in ("VACUUM", f"ATTACH DATABASE '{tmp_path / 'other.db'}' AS other"):
        with engine.connect() as c:
            try:
                c.execute(text(sql))
            except sa.exc.DBAPIError as exc:
                assert "transaction" in str(exc).lower() or "vacuum" in str(exc).lower()
            c.rollback()
    assert _write_ok(engine) < BUSY


# -- (5) results ------------------------------------------------------------------


def test_duplicate_column_names_core_select_are_disambiguated(tmp_path):
    engine = _engine(tmp_path)
    md = sa.MetaData()
    a = sa.Table("a", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.Text))
    b = sa.Table("b", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.Text))
    md.create_all(engine)
    with engine.begin() as c:
        c.execute(a.insert(), [{"id": 1, "v": "A"}])
        c.execute(b.insert(), [{"id": 2, "v": "B"}])
    with engine.connect() as c:
        row = c.execute(sa.select(a.c.id, b.c.id, a.c.v, b.c.v)).one()
        assert tuple(row) == (1, 2, "A", "B")
        empty = c.execute(sa.select(a.c.id, b.c.id).where(a.c.id == 99))
        assert empty.all() == [] and len(empty.keys()) == 2


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT x FROM t WHERE 0",
        "SELECT x FROM t WHERE 0;",
        "SELECT x FROM t WHERE 0 -- trailing comment",
        "SELECT x FROM t WHERE 0 UNION SELECT x FROM t WHERE 0 ORDER BY 1",
        "WITH c AS (SELECT x FROM t) SELECT x FROM c WHERE 0",
    ],
)
def test_empty_text_select_still_returns_rows(tmp_path, sql):
    engine = _engine(tmp_path)
    with engine.connect() as c:
        result = c.execute(text(sql))
        assert result.returns_rows
        assert result.all() == []
        c.rollback()


def test_returning_with_zero_rows_text(tmp_path):
    engine = _engine(tmp_path)
    with engine.connect() as c:
        result = c.execute(text("UPDATE t SET x = 1 WHERE 0 RETURNING id"))
        assert result.all() == []
        c.rollback()


def test_returning_with_zero_rows_core(tmp_path):
    engine = _engine(tmp_path)
    t = sa.table("t", sa.column("id"), sa.column("x"))
    with engine.connect() as c:
        result = c.execute(sa.update(t).where(t.c.id == -1).values(x=1).returning(t.c.id))
        assert result.all() == []
        assert list(result.keys()) == ["id"]
        c.rollback()


def test_empty_core_select_has_keys(tmp_path):
    engine = _engine(tmp_path)
    t = sa.table("t", sa.column("id"), sa.column("x"))
    with engine.connect() as c:
        result = c.execute(sa.select(t.c.x, t.c.id.label("ident")).where(t.c.id < 0))
        assert list(result.keys()) == ["x", "ident"]
        assert result.all() == []


def test_column_order_is_the_statement_order(tmp_path):
    engine = _engine(tmp_path)
    with engine.begin() as c:
        c.execute(text("INSERT INTO t(id, x) VALUES (1, 'one')"))
    with engine.connect() as c:
        result = c.execute(text("SELECT x, id, x || '!' AS z FROM t"))
        assert list(result.keys()) == ["x", "id", "z"]
        assert result.all() == [("one", 1, "one!")]


def test_rowcount_and_lastrowid(tmp_path):
    engine = _engine(tmp_path)
    with engine.begin() as c:
        r = c.execute(text("INSERT INTO t(x) VALUES (1)"))
        assert r.lastrowid == 1 and r.rowcount == 1
        c.execute(text("INSERT INTO t(x) VALUES (2)"))
        assert c.execute(text("UPDATE t SET x = x + 1")).rowcount == 2
        assert c.execute(text("UPDATE t SET x = 0 WHERE 0")).rowcount == 0
        assert c.execute(text("DELETE FROM t WHERE id = 1")).rowcount == 1
        many = c.execute(text("INSERT INTO t(x) VALUES (:x)"), [{"x": 7}, {"x": 8}, {"x": 9}])
        assert many.rowcount == 3


def test_rowcount_of_with_update(tmp_path):
    engine = _engine(tmp_path)
    with engine.begin() as c:
        c.execute(text("INSERT INTO t(x) VALUES (1), (2), (3)"))
        r = c.execute(text("WITH c(v) AS (SELECT 1) UPDATE t SET x = (SELECT v FROM c)"))
        assert r.rowcount == 3


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "thing"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime.datetime] = mapped_column(sa.DateTime)
    day: Mapped[datetime.date] = mapped_column(sa.Date)
    flag: Mapped[bool] = mapped_column(sa.Boolean)
    blob: Mapped[bytes] = mapped_column(sa.LargeBinary)
    amount: Mapped[decimal.Decimal] = mapped_column(sa.Numeric(10, 2))
    doc: Mapped[dict] = mapped_column(sa.JSON)


def test_orm_type_round_trips(tmp_path):
    engine = _engine(tmp_path)
    Base.metadata.create_all(engine)
    at = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456)
    with Session(engine) as s:
        thing = Thing(
            at=at,
            day=at.date(),
            flag=True,
            blob=b"\x00\xff",
            amount=decimal.Decimal("12.34"),
            doc={"a": [1, None]},
        )
        s.add(thing)
        s.commit()
        assert thing.id == 1
    with Session(engine) as s:
        got = s.get(Thing, 1)
        assert got.at == at and got.day == at.date() and got.flag is True
        assert got.blob == b"\x00\xff" and got.amount == decimal.Decimal("12.34")
        assert got.doc == {"a": [1, None]}
        assert s.scalars(sa.select(Thing).where(Thing.flag.is_(False))).all() == []


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"ab", b"ab"),
        (memoryview(b"cd"), b"cd"),
        (bytearray(b"ef"), b"ef"),
        (True, 1),
        (None, None),
        (2**63 - 1, 2**63 - 1),
        (-(2**63), -(2**63)),
        ("é\x00z", "é\x00z"),
        (1.5, 1.5),
    ],
)
def test_parameter_round_trip(tmp_path, value, expected):
    engine = _engine(tmp_path)
    with engine.connect() as c:
        assert c.execute(text("SELECT :v AS v"), {"v": value}).scalar() == expected


def test_nan_parameter_binds_like_sqlite(tmp_path):
    engine = _engine(tmp_path)
    with engine.connect() as c:
        got = c.execute(text("SELECT :v AS v"), {"v": float("nan")}).scalar()
        assert got is None or (isinstance(got, float) and math.isnan(got))


@pytest.mark.parametrize("value", [2**63, 2**63 + 1, 2**80, -(2**63) - 1])
def test_out_of_range_int_is_refused_not_rounded(tmp_path, value):
    engine = _engine(tmp_path)
    with engine.connect() as c:
        try:
            got = c.execute(text("SELECT :v AS v"), {"v": value}).scalar()
        except sa.exc.DBAPIError:
            return  # refusing it is right (sqlite3 raises OverflowError)
        assert got == value and type(got) is int, f"{value} came back as {got!r}"


def test_large_parameter_count(tmp_path):
    engine = _engine(tmp_path)
    t = sa.table("t", sa.column("id"), sa.column("x"))
    with engine.begin() as c:
        c.execute(text("INSERT INTO t(id, x) VALUES (5, 1), (29999, 2)"))
    with engine.connect() as c:
        got = c.execute(sa.select(t.c.id).where(t.c.id.in_(list(range(30000))))).all()
        assert sorted(got) == [(5,), (29999,)]


# -- (1) events with rows -----------------------------------------------------------


async def test_event_visible_only_after_commit_never_after_rollback(tmp_path):
    engine = _engine(tmp_path)
    transport = await alkpubsub.connect(f"honker+durable://{_db(tmp_path)}")
    try:
        async with transport.subscribe("orders:*", consumer="c", start="earliest") as sub:
            s = Session(engine)
            s.execute(text("INSERT INTO t(x) VALUES (1)"))
            store_transaction(s).publish("orders:rolled", {"n": 1})
            s.rollback()
            s.close()

            s = Session(engine)
            s.execute(text("INSERT INTO t(x) VALUES (2)"))
            store_transaction(s).publish("orders:kept", {"n": 2})
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await sub.get()
            s.commit()
            s.close()
            async with asyncio.timeout(5):
                ev = await sub.get()
            assert ev.topic == "orders:kept"
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await sub.get()
    finally:
        await transport.close()
    assert _xs(engine) == [2]


def test_store_transaction_used_after_commit_writes_nothing(tmp_path):
    engine = _engine(tmp_path)
    with Session(engine) as s:
        tx = store_transaction(s)
        s.execute(text("INSERT INTO t(x) VALUES (1)"))
        s.commit()
        with pytest.raises(alkpubsub.Closed) as info:
            tx.publish("orders:late", {"a": 1})
        assert "transaction" in str(info.value).lower()
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM _honker_stream")).scalar() == 0
    assert _write_ok(engine) < BUSY


def test_deferred_foreign_key_failure_at_commit_is_integrity_error(tmp_path):
    engine = _engine(tmp_path)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE p (id INTEGER PRIMARY KEY)"))
        c.execute(
            text(
                "CREATE TABLE ch (id INTEGER PRIMARY KEY, "
                "pid INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as c:
        c.execute(text("INSERT INTO ch(pid) VALUES (42)"))
    assert _write_ok(engine) < BUSY
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM ch")).scalar() == 0


# -- (2)/(6) concurrency, failures, pool reset ------------------------------------------


def test_threads_with_sessions_all_commit(tmp_path):
    engine = _engine(tmp_path, connect_args={"busy_timeout": 5.0})
    errors: list = []

    def worker(i):
        try:
            for j in range(5):
                with Session(engine) as s:
                    s.execute(text("INSERT INTO t(x) VALUES (:x)"), {"x": i * 100 + j})
                    time.sleep(0.002)
                    s.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
        assert not th.is_alive()
    assert errors == []
    assert len(_xs(engine)) == 40


def test_second_thread_waits_then_succeeds(tmp_path):
    engine = _engine(tmp_path, connect_args={"busy_timeout": 3.0})
    holding, done = threading.Event(), threading.Event()

    def holder():
        with Session(engine) as s:
            s.execute(text("INSERT INTO t(x) VALUES (1)"))
            holding.set()
            time.sleep(0.5)
            s.commit()
        done.set()

    th = threading.Thread(target=holder, daemon=True)
    th.start()
    assert holding.wait(5)
    elapsed = _write_ok(engine, x=2)
    assert done.is_set() and elapsed >= 0.3
    th.join(5)
    assert sorted(_xs(engine)) == [1, 2]


def test_commit_on_another_thread_than_the_write(tmp_path):
    # SQLAlchemy lets a Session move between threads (used by one at a time).
    engine = _engine(tmp_path)
    s = Session(engine)
    _bounded(lambda: s.execute(text("INSERT INTO t(x) VALUES (1)")))
    s.commit()  # must not raise
    s.close()
    assert _xs(engine) == [1]
    assert _write_ok(engine) < BUSY  # the write gate was released


def test_close_on_another_thread_than_the_write(tmp_path):
    engine = _engine(tmp_path)
    s = Session(engine)
    s.execute(text("INSERT INTO t(x) VALUES (1)"))
    try:
        _bounded(s.close)  # pool reset (rollback) on another thread
    finally:
        assert _xs(engine) == []
        assert _write_ok(engine) < BUSY


def _keep(tmp_path):
    """Another handle on the store (an app's transport, say): the shared
    database, and its write gate, outlive the engine's connections."""
    from alkpubsub.storage import open_store

    return open_store(_db(tmp_path), busy_timeout=BUSY)


def test_open_session_garbage_collected_on_another_thread(tmp_path):
    engine = _engine(tmp_path)
    keep = _keep(tmp_path)

    def leak():
        s = Session(engine)
        s.execute(text("INSERT INTO t(x) VALUES (1)"))
        s._cycle = s  # only the cyclic GC frees it, on whichever thread runs it

    gc.disable()
    try:
        leak()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _bounded(gc.collect)
    finally:
        gc.enable()
    try:
        assert _write_ok(engine) < BUSY
        assert _xs(engine) == [12345]
    finally:
        keep.close()


def test_open_session_garbage_collected_same_thread(tmp_path):
    engine = _engine(tmp_path)
    keep = _keep(tmp_path)

    def leak():
        s = Session(engine)
        s.execute(text("INSERT INTO t(x) VALUES (1)"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        leak()
        gc.collect()
    try:
        assert _write_ok(engine) < BUSY
        assert _xs(engine) == [12345]
    finally:
        keep.close()


def test_engine_disposed_under_open_session(tmp_path):
    engine = _engine(tmp_path)
    keep = _keep(tmp_path)
    s = Session(engine)
    s.execute(text("INSERT INTO t(x) VALUES (1)"))
    engine.dispose()
    s.close()
    engine2 = create_engine(_db(tmp_path), connect_args={"busy_timeout": BUSY})
    try:
        assert _write_ok(engine2) < BUSY
        assert _xs(engine2) == [12345]
    finally:
        keep.close()


def test_nested_write_sessions_in_one_thread_fail_fast_and_clearly(tmp_path):
    engine = _engine(tmp_path)
    with Session(engine) as outer:
        outer.execute(text("INSERT INTO t(x) VALUES (1)"))

        def nested():
            with Session(engine) as inner:
                inner.execute(text("INSERT INTO t(x) VALUES (2)"))

        # same thread on purpose: run inline but bound it with a watchdog
        t0 = time.monotonic()
        with pytest.raises(sa.exc.DBAPIError) as info:
            nested()
        assert time.monotonic() - t0 < BUSY + 1
        assert "already open" in str(info.value) or "busy" in str(info.value).lower()
        outer.commit()
    assert _xs(engine) == [1]
    assert _write_ok(engine) < BUSY


def test_failed_statement_leaves_pooled_connection_usable(tmp_path):
    engine = _engine(tmp_path, pool_size=1, max_overflow=0)
    with engine.begin() as c:
        c.execute(text("CREATE UNIQUE INDEX ux ON t(x)"))
    with pytest.raises(sa.exc.IntegrityError), Session(engine) as s:
        s.execute(text("INSERT INTO t(x) VALUES (1)"))
        s.execute(text("INSERT INTO t(x) VALUES (1)"))
        s.commit()
    with pytest.raises(LookupError), Session(engine) as s:
        s.execute(text("INSERT INTO t(x) VALUES (2)"))
        raise LookupError("the application fails mid-transaction")
    with Session(engine) as s:  # same pooled connection
        s.execute(text("INSERT INTO t(x) VALUES (3)"))
        s.commit()
    assert _xs(engine) == [3]


def test_failed_statement_inside_transaction_keeps_the_transaction(tmp_path):
    engine = _engine(tmp_path)
    with engine.begin() as c:
        c.execute(text("CREATE UNIQUE INDEX ux ON t(x)"))
    with engine.connect() as c:
        c.execute(text("INSERT INTO t(x) VALUES (1)"))
        with pytest.raises(sa.exc.OperationalError):
            c.execute(text("INSERT INTO nope VALUES (1)"))
        c.execute(text("INSERT INTO t(x) VALUES (2)"))
        c.commit()
    assert _xs(engine) == [1, 2]


def test_savepoint_rollback_keeps_outer_work(tmp_path):
    engine = _engine(tmp_path)
    with engine.begin() as c:
        c.execute(text("CREATE UNIQUE INDEX ux ON t(x)"))
    with Session(engine) as s:
        s.execute(text("INSERT INTO t(x) VALUES (1)"))
        try:
            with s.begin_nested():
                s.execute(text("INSERT INTO t(x) VALUES (1)"))
        except sa.exc.IntegrityError:
            pass
        s.execute(text("INSERT INTO t(x) VALUES (2)"))
        s.commit()
    assert _xs(engine) == [1, 2]


def test_pool_reset_never_commits_half_a_transaction(tmp_path):
    engine = _engine(tmp_path, pool_size=1, max_overflow=0)
    c = engine.connect()
    c.execute(text("INSERT INTO t(x) VALUES (1)"))
    store_transaction(c).publish("orders:half", {})
    c.close()  # returned to the pool: rollback
    with engine.connect() as c2:
        assert c2.execute(text("SELECT count(*) FROM _honker_stream")).scalar() == 0
    assert _xs(engine) == []
    assert _write_ok(engine) < BUSY


def test_autocommit_isolation_commits_each_statement(tmp_path):
    engine = _engine(tmp_path).execution_options(isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(text("INSERT INTO t(x) VALUES (1)"))
        assert not c.connection.dbapi_connection.in_write_transaction
        with pytest.raises(sa.exc.OperationalError):
            c.execute(text("INSERT INTO nope VALUES (1)"))
        assert not c.connection.dbapi_connection.in_write_transaction
    assert _xs(engine) == [1]
    assert _write_ok(engine) < BUSY


def test_store_closed_under_open_engine(tmp_path):
    from alkpubsub.storage import open_store

    store = open_store(_db(tmp_path), busy_timeout=BUSY)
    engine = create_engine(store)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, x)"))
    store.close()
    assert _write_ok(engine) < BUSY
    assert _xs(engine) == [12345]


def test_immediate_begin_read_modify_write(tmp_path):
    engine = _engine(tmp_path, begin="immediate", connect_args={"busy_timeout": 5.0})
    with engine.begin() as c:
        c.execute(text("INSERT INTO t(id, x) VALUES (1, 0)"))
    errors = []

    def bump():
        try:
            for _ in range(10):
                with Session(engine) as s:
                    x = s.execute(text("SELECT x FROM t WHERE id = 1")).scalar()
                    s.execute(text("UPDATE t SET x = :x WHERE id = 1"), {"x": x + 1})
                    s.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=bump, daemon=True) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
        assert not th.is_alive()
    assert errors == []
    assert _xs(engine) == [40]


# -- (7) no sqlite3 on the file -----------------------------------------------------


def test_python_sqlite3_never_opens_the_file(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, asyncio
        opened = []
        sys.addaudithook(lambda ev, args: opened.append(args) if ev == "sqlite3.connect" else None)
        import sqlalchemy as sa
        from sqlalchemy import text
        from sqlalchemy.orm import Session
        from alkpubsub.storage.sqlalchemy import create_engine, create_async_engine
        path = {_db(tmp_path)!r}
        engine = create_engine(path)
        md = sa.MetaData()
        sa.Table("r", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.Text))
        md.create_all(engine)
        insp = sa.inspect(engine)
        assert insp.get_table_names() and insp.get_columns("r")
        with Session(engine) as s:
            s.execute(text("INSERT INTO r(v) VALUES ('a')")); s.commit()
        from alembic.migration import MigrationContext
        from alembic.operations import Operations
        with engine.begin() as c:
            Operations(MigrationContext.configure(c)).add_column("r", sa.Column("w", sa.Integer))
        async def main():
            e = create_async_engine(path)
            async with e.connect() as c:
                await c.run_sync(lambda sc: sc.execute(text("SELECT 1")).all())
            await e.dispose()
        asyncio.run(main())
        print("OPENED", opened)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OPENED []" in out.stdout, out.stdout


# -- (3) async --------------------------------------------------------------------


async def _aengine(tmp_path, **kwargs):
    kwargs.setdefault("connect_args", {"busy_timeout": BUSY})
    engine = create_async_engine(_db(tmp_path), **kwargs)
    async with engine.begin() as c:
        await c.execute(text("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, x)"))
    return engine


async def _axs(engine):
    async with engine.connect() as c:
        return await c.run_sync(
            lambda sc: [r[0] for r in sc.execute(text("SELECT x FROM t ORDER BY id")).all()]
        )


async def _awrite_ok(engine, x=777):
    t0 = time.monotonic()
    async with asyncio.timeout(BUSY * 3 + 2):
        async with AsyncSession(engine) as s:
            await s.execute(text("INSERT INTO t(x) VALUES (:x)"), {"x": x})
            await s.commit()
    return time.monotonic() - t0


async def test_async_connection_execute_select_returns_rows(tmp_path):
    engine = await _aengine(tmp_path)
    try:
        async with asyncio.timeout(10):
            async with engine.connect() as c:
                result = await c.execute(sa.select(sa.literal(1).label("one")))
                assert result.all() == [(1,)]
    finally:
        await engine.dispose()


async def test_async_session_execute_select_returns_rows(tmp_path):
    engine = await _aengine(tmp_path)
    try:
        async with asyncio.timeout(10):
            async with AsyncSession(engine) as s:
                await s.execute(text("INSERT INTO t(x) VALUES (4)"))
                result = await s.execute(text("SELECT x FROM t"))
                assert result.scalars().all() == [4]
    finally:
        await engine.dispose()


async def test_async_many_concurrent_sessions_commit_and_loop_stays_free(tmp_path):
    engine = await _aengine(tmp_path, connect_args={"busy_timeout": 5.0})
    lag = [0.0]
    stop = asyncio.Event()

    async def ticker():
        while not stop.is_set():
            t0 = time.monotonic()
            await asyncio.sleep(0.005)
            lag[0] = max(lag[0], time.monotonic() - t0 - 0.005)

    async def one(i):
        async with AsyncSession(engine) as s:
            await s.execute(text("INSERT INTO t(x) VALUES (:x)"), {"x": i})
            tx = await async_store_transaction(s)
            await tx.publish("orders:many", {"i": i})
            await asyncio.sleep(0.01)  # hold the write transaction a little
            await s.commit()

    tick = asyncio.create_task(ticker())
    try:
        async with asyncio.timeout(60):
            results = await asyncio.gather(*(one(i) for i in range(40)), return_exceptions=True)
        assert [r for r in results if r is not None] == []
        assert sorted(await _axs(engine)) == list(range(40))
        assert lag[0] < 0.1, f"event loop blocked for {lag[0]:.3f} s"
    finally:
        stop.set()
        await tick
        await engine.dispose()


async def test_async_wait_for_timeout_around_blocked_write(tmp_path):
    engine = await _aengine(tmp_path, connect_args={"busy_timeout": 2.0})
    sync_engine = create_engine(_db(tmp_path))
    holding, release = threading.Event(), threading.Event()

    def holder():
        with sync_engine.begin() as c:
            c.execute(text("INSERT INTO t(x) VALUES (1)"))
            holding.set()
            release.wait(10)

    th = threading.Thread(target=holder, daemon=True)
    th.start()
    try:
        assert holding.wait(5)
        async with asyncio.timeout(15):
            async with AsyncSession(engine) as s:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(s.execute(text("INSERT INTO t(x) VALUES (2)")), 0.3)
                release.set()
                with contextlib.suppress(Exception):
                    await s.rollback()
        await asyncio.to_thread(th.join, 5)
        assert await _awrite_ok(engine) < 2.0
        assert sorted(await _axs(engine)) == [1, 777]
    finally:
        release.set()
        await engine.dispose()


async def test_async_cancel_mid_commit_releases_gate(tmp_path):
    engine = await _aengine(tmp_path)
    try:
        for i in range(10):
            s = AsyncSession(engine)
            await s.execute(text("INSERT INTO t(x) VALUES (:x)"), {"x": i})
            task = asyncio.create_task(s.commit())
            for _ in range(i % 3):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            async with asyncio.timeout(BUSY * 3 + 2):
                await s.close()
        assert await _awrite_ok(engine) < BUSY
    finally:
        await engine.dispose()


async def test_async_two_write_sessions_in_one_task_fail_bounded(tmp_path):
    engine = await _aengine(tmp_path)
    try:
        async with asyncio.timeout(BUSY * 3 + 2):
            async with AsyncSession(engine) as a, AsyncSession(engine) as b:
                await a.execute(text("INSERT INTO t(x) VALUES (1)"))
                with pytest.raises(sa.exc.DBAPIError):
                    await b.execute(text("INSERT INTO t(x) VALUES (2)"))
                await a.commit()
        assert await _axs(engine) == [1]
    finally:
        await engine.dispose()


async def test_async_transport_publish_inside_open_session_is_bounded(tmp_path):
    engine = await _aengine(tmp_path)
    transport = await alkpubsub.connect(f"honker+durable://{_db(tmp_path)}")
    try:
        async with AsyncSession(engine) as s:
            await s.execute(text("INSERT INTO t(x) VALUES (1)"))
            async with asyncio.timeout(BUSY * 3 + 5):
                with pytest.raises(alkpubsub.PubSubError):
                    await transport.publish("orders:x", {})
            await s.rollback()
    finally:
        await transport.close()
        await engine.dispose()


async def test_async_publish_commit_and_rollback(tmp_path):
    engine = await _aengine(tmp_path)
    transport = await alkpubsub.connect(f"honker+durable://{_db(tmp_path)}")
    try:
        async with transport.subscribe("orders:*", consumer="c", start="earliest") as sub:
            async with AsyncSession(engine) as s:
                await s.execute(text("INSERT INTO t(x) VALUES (1)"))
                await (await async_store_transaction(s)).publish("orders:no", {})
                await s.rollback()
            async with AsyncSession(engine) as s:
                await s.execute(text("INSERT INTO t(x) VALUES (2)"))
                await (await async_store_transaction(s)).publish("orders:yes", {})
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await sub.get()
                await s.commit()
            async with asyncio.timeout(5):
                ev = await sub.get()
            assert ev.topic == "orders:yes"
        assert await _axs(engine) == [2]
    finally:
        await transport.close()
        await engine.dispose()


def test_async_adapted_connection_repr_does_not_recurse(tmp_path):
    # SQLAlchemy reprs the DB-API connection in pool logging and in the
    # garbage collector's "non-checked-in connection" warning.
    async def main():
        engine = await _aengine(tmp_path)
        try:
            async with engine.connect() as c:
                raw = await c.get_raw_connection()
                assert "AdaptedConnection" in repr(raw.dbapi_connection)
        finally:
            await engine.dispose()

    asyncio.run(main())


async def test_async_session_garbage_collected_releases_gate(tmp_path):
    engine = await _aengine(tmp_path)
    keep = _keep(tmp_path)
    try:

        async def leak():
            s = AsyncSession(engine)
            await s.execute(text("INSERT INTO t(x) VALUES (1)"))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            await leak()
            gc.collect()
            await asyncio.sleep(0.1)
        assert await _awrite_ok(engine) < BUSY * 3
        assert await _axs(engine) == [777]
    finally:
        await engine.dispose()
        keep.close()


# -- late additions ------------------------------------------------------------------


def test_connection_publish_then_commit_is_visible(tmp_path):
    # store_transaction() accepts a Connection; connection.commit() must commit it.
    engine = _engine(tmp_path)
    with engine.connect() as c:
        store_transaction(c).publish("orders:conn", {"n": 1})
        c.commit()
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM _honker_stream")).scalar() == 1


def test_connection_publish_after_begin_is_visible(tmp_path):
    engine = _engine(tmp_path)
    with engine.begin() as c:
        store_transaction(c).publish("orders:conn", {"n": 1})
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM _honker_stream")).scalar() == 1


async def test_async_store_transaction_used_after_commit(tmp_path):
    # After commit the session's connection is back in the pool: a publish
    # through the old handle must fail, not open a write transaction on a
    # pooled connection (holding the gate, and committed by its next user).
    engine = await _aengine(tmp_path)
    try:
        async with AsyncSession(engine) as s:
            await s.execute(text("INSERT INTO t(x) VALUES (1)"))
            tx = await async_store_transaction(s)
            await s.commit()
            with pytest.raises(alkpubsub.Closed):
                async with asyncio.timeout(5):
                    await tx.publish("orders:late", {})
        sync_engine = create_engine(_db(tmp_path))
        t0 = time.monotonic()
        await asyncio.to_thread(_write_ok, sync_engine, 2)
        assert time.monotonic() - t0 < BUSY
        assert await _awrite_ok(engine, 3) < BUSY
        async with engine.connect() as c:
            n = await c.run_sync(
                lambda sc: sc.execute(text("SELECT count(*) FROM _honker_stream")).scalar()
            )
        assert n == 0, "the late event was committed by the pooled connection's next user"
    finally:
        await engine.dispose()


def test_orm_add_all_assigns_the_right_ids(tmp_path):
    engine = _engine(tmp_path)

    class B2(DeclarativeBase):
        pass

    class Row(B2):
        __tablename__ = "row"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

    B2.metadata.create_all(engine)
    with Session(engine) as s:
        rows = [Row(name=f"n{i}") for i in range(1500)]
        s.add_all(rows)
        s.commit()
        ids = [r.id for r in rows]
    assert ids == list(range(1, 1501))
    with Session(engine) as s:
        got = dict(s.execute(sa.select(Row.id, Row.name)).all())
        assert all(got[i + 1] == f"n{i}" for i in range(1500))


async def test_async_savepoint_and_orm(tmp_path):
    engine = await _aengine(tmp_path)
    try:
        async with asyncio.timeout(10):
            async with AsyncSession(engine) as s:
                await s.execute(text("INSERT INTO t(x) VALUES (1)"))
                try:
                    async with s.begin_nested():
                        await s.execute(text("INSERT INTO t(x) VALUES (2)"))
                        raise RuntimeError("undo the savepoint")
                except RuntimeError:
                    pass
                await s.commit()
        assert await _axs(engine) == [1]
    finally:
        await engine.dispose()


def test_reads_do_not_wait_for_another_threads_write_transaction(tmp_path):
    engine = _engine(tmp_path, connect_args={"busy_timeout": 5.0})
    with engine.begin() as c:
        c.execute(text("INSERT INTO t(x) VALUES (1)"))
    holding, release = threading.Event(), threading.Event()

    def holder():
        with Session(engine) as s:
            s.execute(text("INSERT INTO t(x) VALUES (2)"))
            holding.set()
            release.wait(10)
            s.rollback()

    th = threading.Thread(target=holder, daemon=True)
    th.start()
    try:
        assert holding.wait(5)
        t0 = time.monotonic()
        assert _bounded(lambda: _xs(engine), 3) == [1]
        assert time.monotonic() - t0 < 0.5
    finally:
        release.set()
        th.join(5)


async def test_sync_session_in_loop_then_transport_publish_fails_fast(tmp_path):
    engine = _engine(tmp_path)
    transport = await alkpubsub.connect(f"honker+durable://{_db(tmp_path)}")
    try:
        with Session(engine) as s:
            s.execute(text("INSERT INTO t(x) VALUES (1)"))
            t0 = time.monotonic()
            async with asyncio.timeout(BUSY * 3 + 2):
                with pytest.raises(alkpubsub.PubSubError):
                    await transport.publish("orders:x", {})
            assert time.monotonic() - t0 < BUSY
            s.rollback()
    finally:
        await transport.close()


def test_orm_version_counter_detects_stale_update(tmp_path):
    engine = _engine(tmp_path)

    class B3(DeclarativeBase):
        pass

    class Doc(B3):
        __tablename__ = "doc"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str]
        version: Mapped[int] = mapped_column(nullable=False)
        __mapper_args__ = {"version_id_col": version}

    B3.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Doc(id=1, body="a"))
        s.commit()
    s1, s2 = Session(engine), Session(engine)
    d1, d2 = s1.get(Doc, 1), s2.get(Doc, 1)
    d1.body = "b"
    s1.commit()
    s1.close()
    d2.body = "c"
    with pytest.raises(sa.orm.exc.StaleDataError):
        s2.commit()
    s2.close()
    assert _write_ok(engine) < BUSY


async def test_async_engine_disposed_under_open_session(tmp_path):
    engine = await _aengine(tmp_path)
    keep = _keep(tmp_path)
    try:
        async with asyncio.timeout(10):
            s = AsyncSession(engine)
            await s.execute(text("INSERT INTO t(x) VALUES (1)"))
            await engine.dispose()
            await s.close()
        engine2 = create_async_engine(_db(tmp_path))
        try:
            assert await _awrite_ok(engine2) < BUSY
            assert await _axs(engine2) == [777]
        finally:
            await engine2.dispose()
    finally:
        keep.close()


def test_reflection_sees_schema_changes_committed_after_earlier_reads(tmp_path):
    engine = _engine(tmp_path)
    with engine.connect() as c:  # warm the readers' statement caches
        for _ in range(5):
            c.execute(text("PRAGMA foreign_key_list(ch)")).all()
            c.execute(text("PRAGMA table_info(ch)")).all()
            assert not sa.inspect(c).has_table("ch")
    with engine.begin() as c:
        c.execute(text("CREATE TABLE p (id INTEGER PRIMARY KEY)"))
        c.execute(text("CREATE TABLE ch (id INTEGER PRIMARY KEY, pid INTEGER REFERENCES p(id))"))
    for _ in range(5):
        with engine.connect() as c:
            assert len(c.execute(text("PRAGMA foreign_key_list(ch)")).all()) == 1
            assert [r[1] for r in c.execute(text("PRAGMA main.table_info('ch')")).all()] == [
                "id",
                "pid",
            ]
            insp = sa.inspect(c)
            assert insp.has_table("ch")
            assert [fk["referred_table"] for fk in insp.get_foreign_keys("ch")] == ["p"]
    with engine.begin() as c:
        c.execute(text("ALTER TABLE ch ADD COLUMN extra TEXT"))
    with engine.connect() as c:
        assert [col["name"] for col in sa.inspect(c).get_columns("ch")] == ["id", "pid", "extra"]


def test_empty_select_star_has_the_same_keys_as_a_full_one(tmp_path):
    engine = _engine(tmp_path)
    t = sa.table("t", sa.column("id"), sa.column("x"))
    with engine.begin() as c:
        c.execute(text("INSERT INTO t(x) VALUES (1)"))
    star = sa.select(sa.literal_column("*")).select_from(t)
    with engine.connect() as c:
        full = list(c.execute(star).keys())
        empty = list(c.execute(star.where(sa.false())).keys())
    assert full == ["id", "x"]
    assert empty == full


def test_quoted_and_unicode_column_names(tmp_path):
    engine = _engine(tmp_path)
    with engine.begin() as c:
        c.execute(text('CREATE TABLE q ("order id" INTEGER, "ü" TEXT)'))
        c.execute(text("INSERT INTO q VALUES (1, 'é')"))
    with engine.connect() as c:
        r = c.execute(text('SELECT "order id", "ü", "ü" || \'!\' AS "a b" FROM q'))
        assert list(r.keys()) == ["order id", "ü", "a b"] and r.all() == [(1, "é", "é!")]
        r = c.execute(text('SELECT "order id", "ü" FROM q WHERE 0'))
        assert list(r.keys()) == ["order id", "ü"] and r.all() == []


def test_big_blob_round_trip(tmp_path):
    engine = _engine(tmp_path)
    blob = os.urandom(5 * 1024 * 1024)
    with engine.begin() as c:
        c.execute(text("INSERT INTO t(id, x) VALUES (1, :b)"), {"b": blob})
    with engine.connect() as c:
        assert c.execute(text("SELECT x FROM t WHERE id = 1")).scalar() == blob


async def test_async_stream_results(tmp_path):
    # Not a listed promise: AsyncConnection.stream()/AsyncSession.stream() are
    # SQLAlchemy's async way to read rows (aiosqlite supports them).
    engine = await _aengine(tmp_path)
    try:
        async with asyncio.timeout(10):
            async with engine.connect() as c:
                result = await c.stream(sa.select(sa.literal(1).label("one")))
                assert [tuple(r) async for r in result] == [(1,)]
    finally:
        await engine.dispose()


async def test_sync_session_driven_through_asyncio_to_thread(tmp_path):
    # A common way to use a sync Session from async code: each call on a
    # worker thread (asyncio.to_thread runs it in a copy of the caller's context).
    engine = _engine(tmp_path)
    s = Session(engine)
    try:
        async with asyncio.timeout(10):
            await asyncio.to_thread(s.execute, text("INSERT INTO t(x) VALUES (1)"))
            await asyncio.to_thread(s.commit)
    finally:
        await asyncio.to_thread(s.close)
    assert _xs(engine) == [1]
    assert await asyncio.to_thread(_write_ok, engine) < BUSY
