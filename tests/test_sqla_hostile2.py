"""Hostile review, second round: the SQLAlchemy dialect's home-thread design
(storage/sqla_home.py), the sqla_writers registry, RETURNING/probe recovery,
parameter validation, concurrency and fork/shutdown.

Each test asserts a promise; a failing test is a broken promise. Every wait
is bounded (join timeouts, asyncio.timeout, subprocess timeouts)."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import enum
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings

import pytest
import sqlalchemy as sa
from sqla_helpers import BUSY
from sqla_helpers import bounded as _bounded
from sqla_helpers import db as _db
from sqla_helpers import engine_on as _engine
from sqla_helpers import write_ok as _write_ok
from sqla_helpers import xs as _xs
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import alkpubsub
from alkpubsub.storage import open_store
from alkpubsub.storage.sqlalchemy import (
    create_async_engine,
    create_engine,
    store_transaction,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_script(script: str, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _publish_here(path: str, topic: str = "orders:x", timeout: float = BUSY * 3 + 2):
    """Publish through a fresh transport on an event loop of the calling thread."""

    async def main():
        transport = await alkpubsub.connect(f"honker+durable://{path}")
        try:
            async with asyncio.timeout(timeout):
                await transport.publish(topic, {"n": 1})
        finally:
            await transport.close()

    asyncio.run(main())


class _Worker:
    """A thread that runs the callables given to it, one at a time (so a test
    can do several steps on the SAME thread, bounded)."""

    def __init__(self):
        import queue

        self._q: queue.Queue = queue.Queue()
        self._th = threading.Thread(target=self._loop, daemon=True)
        self._th.start()

    def _loop(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, box, done = item
            try:
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc
            done.set()

    def __call__(self, fn, timeout: float = 10.0):
        box: dict = {}
        done = threading.Event()
        self._q.put((fn, box, done))
        assert done.wait(timeout), f"{fn} did not finish in {timeout} s (hang)"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def ident(self):
        return self(threading.get_ident)

    def stop(self):
        self._q.put(None)
        self._th.join(5)


# -- the home thread: interrupts -------------------------------------------------------


def test_keyboard_interrupt_while_waiting_for_begin_does_not_leak_the_gate(tmp_path):
    """A Ctrl-C while a session waits for the write gate (its BEGIN runs on the
    home thread) must not leave that BEGIN holding the gate for ever."""
    script = f"""
        import signal, threading, time, sys
        from sqlalchemy import text
        from sqlalchemy.orm import Session
        from alkpubsub.storage.sqlalchemy import create_engine
        path = {_db(tmp_path)!r}
        engine = create_engine(path, connect_args={{"busy_timeout": 3.0}})
        with engine.begin() as c:
            c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, x)"))
        holding, release = threading.Event(), threading.Event()
        def holder():
            with Session(engine) as s:
                s.execute(text("INSERT INTO t(x) VALUES (1)"))
                holding.set()
                release.wait(10)
                s.commit()
        th = threading.Thread(target=holder); th.start(); holding.wait(5)
        def on_alarm(*a):
            raise KeyboardInterrupt
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        s = Session(engine)
        try:
            s.execute(text("INSERT INTO t(x) VALUES (2)"))
            print("NO-INTERRUPT")
        except KeyboardInterrupt:
            print("INTERRUPTED")
        release.set(); th.join(10)
        try:
            s.close()
        except BaseException as exc:
            print("CLOSE-ERR", type(exc).__name__)
        time.sleep(0.3)
        t0 = time.monotonic()
        box = {{}}
        def later():
            try:
                with Session(engine) as s2:
                    s2.execute(text("INSERT INTO t(x) VALUES (3)"))
                    s2.commit()
                box["ok"] = True
            except BaseException as exc:
                box["err"] = repr(exc)[:300]
        th2 = threading.Thread(target=later, daemon=True); th2.start(); th2.join(15)
        print("LATER", box, round(time.monotonic() - t0, 2))
        with engine.connect() as c:
            print("ROWS", [r[0] for r in c.execute(text("SELECT x FROM t ORDER BY id"))])
        sys.stdout.flush()
        import os; os._exit(0)
    """
    out = _run_script(script, timeout=60)
    assert "INTERRUPTED" in out.stdout, (out.stdout, out.stderr[-2000:])
    assert "LATER {'ok': True}" in out.stdout, (out.stdout, out.stderr[-2000:])
    assert "ROWS [1, 3]" in out.stdout, out.stdout


# -- the home thread: re-entry on the same calling thread ----------------------------------


def test_store_transaction_inside_open_session_same_thread_fails_fast(tmp_path):
    """store.transaction() from a thread whose Session holds the write
    transaction can never succeed; the gate's 'already open in this thread'
    refusal used to say so at once. It must not wait out busy_timeout."""
    engine = _engine(tmp_path, busy=3.0)
    store = open_store(_db(tmp_path), busy_timeout=3.0)
    try:
        with Session(engine) as s:
            s.execute(text("INSERT INTO t(x) VALUES (1)"))
            t0 = time.monotonic()
            with pytest.raises(alkpubsub.PubSubError), store.transaction() as tx:
                tx.execute("INSERT INTO t(x) VALUES (2)")
            waited = time.monotonic() - t0
            s.commit()
        assert waited < 1.0, f"waited {waited:.2f} s (busy_timeout) before refusing"
        assert _xs(engine) == [1]
    finally:
        store.close()


def test_session_write_inside_store_transaction_same_thread_fails_fast(tmp_path):
    engine = _engine(tmp_path, busy=3.0)
    store = open_store(_db(tmp_path), busy_timeout=3.0)
    try:
        with store.transaction() as tx:
            tx.execute("INSERT INTO t(x) VALUES (1)")
            t0 = time.monotonic()
            with pytest.raises(sa.exc.DBAPIError), Session(engine) as s:
                s.execute(text("INSERT INTO t(x) VALUES (2)"))
            waited = time.monotonic() - t0
        assert waited < 1.0, f"waited {waited:.2f} s (busy_timeout) before refusing"
        assert _xs(engine) == [1]
    finally:
        store.close()


# -- the home thread: SQLAlchemy events and callbacks ----------------------------------------


def test_connect_listener_enabling_foreign_keys_does_not_wedge(tmp_path):
    """The documented SQLAlchemy recipe for SQLite: PRAGMA foreign_keys=ON in a
    "connect" listener. It must not leave the connection holding the write
    gate while it sits idle in the pool."""
    engine = _engine(tmp_path)

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, record):
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    engine.dispose()  # new connections run the listener
    with engine.connect() as c:
        assert c.execute(text("SELECT 1")).scalar() == 1
    # The pooled connection is idle: another thread must be able to write now.
    assert _write_ok(engine) < BUSY
    assert _xs(engine) == [12345]


def test_checkout_listener_writing_sql_then_session_commits(tmp_path):
    engine = _engine(tmp_path)
    seen = []

    @event.listens_for(engine, "checkout")
    def on_checkout(dbapi_connection, record, proxy):
        cur = dbapi_connection.cursor()
        cur.execute("SELECT count(*) AS n FROM t")
        seen.append(cur.fetchone()[0])
        cur.close()

    def work():
        with Session(engine) as s:
            s.execute(text("INSERT INTO t(x) VALUES (5)"))
            s.commit()

    _bounded(work)
    _bounded(work)
    assert _xs(engine) == [5, 5]
    assert seen[:2] == [0, 1]


def test_after_cursor_execute_listener_reenters_same_connection(tmp_path):
    """A listener running more SQL on the same connection, inside a write
    transaction, must not deadlock (the hop to the home thread must not be
    taken twice from the home thread's point of view)."""
    engine = _engine(tmp_path)
    counts = []

    @event.listens_for(engine, "after_cursor_execute")
    def after(conn, cursor, statement, params, context, executemany):
        if statement.startswith("INSERT"):
            cur = conn.connection.dbapi_connection.cursor()
            cur.execute("SELECT count(*) AS n FROM t")
            counts.append(cur.fetchone()[0])

    def work():
        with Session(engine) as s:
            s.execute(text("INSERT INTO t(x) VALUES (1)"))
            s.execute(text("INSERT INTO t(x) VALUES (2)"))
            s.commit()

    _bounded(work)
    assert counts == [1, 2]


def test_gc_of_a_leaked_session_on_the_home_thread_of_another(tmp_path):
    """A leaked Session (reference cycle) collected while another connection's
    home thread runs a statement: neither may hang."""
    engine = _engine(tmp_path)

    def leak():
        s = Session(engine)
        s.execute(text("INSERT INTO t(x) VALUES (1)"))
        s.rollback()  # write gate released; the checked-out connection leaks
        s.execute(text("SELECT 1"))
        s._cycle = s

    gc.disable()
    try:
        _bounded(leak)
        with Session(engine) as s:
            s.execute(text("INSERT INTO t(x) VALUES (2)"))
            conn = s.connection().connection.dbapi_connection
            # collect on conn's home thread
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                conn.session.executor().submit(gc.collect).result(10)
            s.commit()
    finally:
        gc.enable()
    assert _xs(engine) == [2]
    assert _write_ok(engine) < BUSY


def test_engine_dispose_while_another_thread_is_mid_statement(tmp_path):
    engine = _engine(tmp_path, busy=5.0)
    keep = open_store(_db(tmp_path))
    started = threading.Event()
    box: dict = {}
    slow = (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3000000) "
        "INSERT INTO t(x) SELECT count(*) FROM r"
    )

    def work():
        try:
            with Session(engine) as s:
                s.execute(text("INSERT INTO t(x) VALUES (0)"))
                started.set()
                s.execute(text(slow))
                s.commit()
            box["ok"] = True
        except BaseException as exc:
            box["err"] = exc

    th = threading.Thread(target=work, daemon=True)
    th.start()
    try:
        assert started.wait(5)
        time.sleep(0.05)
        engine.dispose()
        th.join(30)
        assert not th.is_alive()
        assert box.get("ok"), box
        assert _xs(engine) == [0, 3000000]
        assert _write_ok(engine) < BUSY * 3
    finally:
        keep.close()


@pytest.mark.parametrize(
    "pragmas",
    [
        ("PRAGMA foreign_keys=ON",),
        ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA foreign_keys=ON"),
    ],
    ids=["foreign_keys", "full-recipe"],
)
def test_connect_pragma_recipe_does_not_block_writers_while_reading(tmp_path, pragmas):
    """SQLAlchemy's documented SQLite recipe (PRAGMAs in a "connect" listener),
    then a connection that only reads, kept open: the listener must not fail,
    and another thread must still be able to write (over sqlite3 the PRAGMAs
    run outside any transaction and hold no lock)."""
    engine = _engine(tmp_path, pool_size=5)

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, record):
        cur = dbapi_connection.cursor()
        for pragma in pragmas:
            cur.execute(pragma)
        cur.close()

    engine.dispose()
    first = engine.connect()  # the pool's first connection after dispose
    try:
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM t")).scalar() == 0
            # c stays checked out, reading only
            assert _write_ok(engine) < BUSY
        assert _xs(engine) == [12345]
    finally:
        first.close()


# -- thread leaks ----------------------------------------------------------------


def _home_threads():
    return [t for t in threading.enumerate() if t.name.startswith("alkpubsub-sqla")]


def test_home_threads_go_away_after_dispose(tmp_path):
    gc.collect()
    time.sleep(0.2)
    before = threading.active_count()
    for i in range(30):
        engine = create_engine(_db(tmp_path, f"f{i % 3}.db"), pool_size=3)
        with engine.begin() as c:
            c.execute(text("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, x)"))
        ths = [threading.Thread(target=_write_ok, args=(engine,)) for _ in range(3)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(20)
        engine.dispose()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (threading.active_count() > before or _home_threads()):
        gc.collect()
        time.sleep(0.1)
    assert _home_threads() == [], [t.name for t in _home_threads()]
    assert threading.active_count() <= before, [t.name for t in threading.enumerate()]


async def test_async_home_threads_go_away_after_dispose(tmp_path):
    gc.collect()
    await asyncio.sleep(0.2)
    for i in range(15):
        engine = create_async_engine(_db(tmp_path, f"a{i % 3}.db"))
        async with asyncio.timeout(20):
            async with engine.begin() as c:
                await c.execute(text("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, x)"))

            async def one(engine=engine):
                async with AsyncSession(engine) as s:
                    await s.execute(text("INSERT INTO t(x) VALUES (1)"))
                    await s.commit()

            await asyncio.gather(*(one() for _ in range(3)))
            await engine.dispose()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _home_threads():
        gc.collect()
        await asyncio.sleep(0.1)
    assert _home_threads() == [], [t.name for t in _home_threads()]


def test_sessions_leaked_to_gc_do_not_leak_home_threads(tmp_path):
    engine = _engine(tmp_path, pool_size=2, max_overflow=50)
    gc.collect()
    time.sleep(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(40):
            s = Session(engine)
            s.execute(text("INSERT INTO t(x) VALUES (:x)"), {"x": i})
            s.commit()
            s.connection()  # checked out again, then dropped without close
            del s
            gc.collect()
    engine.dispose()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _home_threads():
        gc.collect()
        time.sleep(0.1)
    assert len(_home_threads()) == 0, len(_home_threads())
    assert len(_xs(create_engine(_db(tmp_path)))) == 40


# -- interpreter shutdown and fork -------------------------------------------------------


def test_exit_with_open_write_transaction_does_not_hang_or_commit(tmp_path):
    path = _db(tmp_path)
    script = f"""
        from sqlalchemy import text
        from sqlalchemy.orm import Session
        from alkpubsub.storage.sqlalchemy import create_engine, store_transaction
        engine = create_engine({path!r})
        with engine.begin() as c:
            c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, x)"))
        s = Session(engine)
        s.execute(text("INSERT INTO t(x) VALUES (1)"))
        store_transaction(s).publish("orders:half", {{"a": 1}})
        GLOBAL = s  # never committed, never closed
        print("EXITING", flush=True)
    """
    t0 = time.monotonic()
    out = _run_script(script, timeout=30)
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    assert "EXITING" in out.stdout
    assert took < 15, f"exit took {took:.1f} s"
    engine = create_engine(path, connect_args={"busy_timeout": BUSY})
    assert _xs(engine) == []
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM _honker_stream")).scalar() == 0
        assert c.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    assert _write_ok(engine) < BUSY
    assert _xs(engine) == [12345]
    engine.dispose()


def test_exit_while_another_thread_waits_for_the_gate(tmp_path):
    path = _db(tmp_path)
    script = f"""
        import threading, time
        from sqlalchemy import text
        from sqlalchemy.orm import Session
        from alkpubsub.storage.sqlalchemy import create_engine
        engine = create_engine({path!r}, connect_args={{"busy_timeout": 2.0}})
        with engine.begin() as c:
            c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, x)"))
        s = Session(engine)
        s.execute(text("INSERT INTO t(x) VALUES (1)"))
        def waiter():
            try:
                with Session(engine) as s2:
                    s2.execute(text("INSERT INTO t(x) VALUES (2)"))
                    s2.commit()
            except Exception as exc:
                print("WAITER", type(exc).__name__, flush=True)
        threading.Thread(target=waiter, daemon=True).start()
        time.sleep(0.2)
        print("EXITING", flush=True)
    """
    out = _run_script(script, timeout=30)
    assert out.returncode == 0, out.stderr[-2000:]
    engine = create_engine(path, connect_args={"busy_timeout": BUSY})
    assert _xs(engine) == []
    assert _write_ok(engine) < BUSY
    engine.dispose()


def test_fork_child_using_inherited_engine_fails_clearly_or_works(tmp_path):
    path = _db(tmp_path)
    script = f"""
        import os, sys, time, signal, warnings
        warnings.simplefilter("ignore")
        from sqlalchemy import text
        from sqlalchemy.orm import Session
        from alkpubsub.storage.sqlalchemy import create_engine
        engine = create_engine({path!r}, connect_args={{"busy_timeout": 2.0}})
        with engine.begin() as c:
            c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, x)"))
        with Session(engine) as s:  # a pooled connection with a home thread
            s.execute(text("INSERT INTO t(x) VALUES (1)"))
            s.commit()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                with Session(engine) as s:
                    s.execute(text("INSERT INTO t(x) VALUES (2)"))
                    s.commit()
                    print("CHILD-WROTE", flush=True)
            except Exception as exc:
                print("CHILD-ERR", type(exc).__name__, str(exc)[:200], flush=True)
                code = 3
            os._exit(code)
        deadline = time.monotonic() + 15
        status = None
        while time.monotonic() < deadline:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
            time.sleep(0.05)
        if status is None:
            os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
            print("CHILD-HUNG", flush=True)
        with Session(engine) as s:
            s.execute(text("INSERT INTO t(x) VALUES (9)"))
            s.commit()
        with engine.connect() as c:
            print("ROWS", [r[0] for r in c.execute(text("SELECT x FROM t ORDER BY id"))])
            print("CHECK", c.execute(text("PRAGMA integrity_check")).scalar())
    """
    out = _run_script(script, timeout=60)
    assert out.returncode == 0, (out.stdout, out.stderr[-2000:])
    assert "CHILD-HUNG" not in out.stdout, out.stdout
    assert "CHECK ok" in out.stdout, out.stdout
    if "CHILD-WROTE" in out.stdout:
        assert "ROWS [1, 2, 9]" in out.stdout, out.stdout
    else:
        assert "CHILD-ERR" in out.stdout and "ROWS [1, 9]" in out.stdout, out.stdout


def test_fork_child_after_dispose_close_false_recipe(tmp_path):
    """SQLAlchemy's documented fork recipe: engine.dispose(close=False) in the
    child, then use it. Both processes write; nothing lost, file intact."""
    path = _db(tmp_path)
    script = f"""
        import os, time, signal, warnings
        warnings.simplefilter("ignore")
        from sqlalchemy import text
        from sqlalchemy.orm import Session
        from alkpubsub.storage.sqlalchemy import create_engine
        engine = create_engine({path!r}, connect_args={{"busy_timeout": 5.0}})
        with engine.begin() as c:
            c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, x)"))
        with Session(engine) as s:
            s.execute(text("INSERT INTO t(x) VALUES (1)")); s.commit()
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)
            engine.dispose(close=False)
            for i in range(200):
                with Session(engine) as s:
                    s.execute(text("INSERT INTO t(x) VALUES (2)")); s.commit()
            os._exit(0)
        for i in range(200):
            with Session(engine) as s:
                s.execute(text("INSERT INTO t(x) VALUES (3)")); s.commit()
        deadline = time.monotonic() + 25
        status = None
        while time.monotonic() < deadline:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st; break
            time.sleep(0.05)
        print("STATUS", status)
        with engine.connect() as c:
            q = "SELECT x, count(*) FROM t GROUP BY x ORDER BY x"
            print("COUNTS", c.execute(text(q)).all())
            print("CHECK", c.execute(text("PRAGMA integrity_check")).scalar())
    """
    out = _run_script(script, timeout=60)
    assert out.returncode == 0, (out.stdout, out.stderr[-2000:])
    assert "STATUS 0" in out.stdout, out.stdout
    assert "COUNTS [(1, 1), (2, 200), (3, 200)]" in out.stdout, out.stdout
    assert "CHECK ok" in out.stdout, out.stdout


# -- the sqla_writers registry ------------------------------------------------------------


def test_publish_to_a_different_file_while_session_open_is_allowed(tmp_path):
    engine = _engine(tmp_path)
    other = _db(tmp_path, "other.db")
    w = _Worker()
    try:
        s = w(lambda: Session(engine))
        w(lambda: s.execute(text("INSERT INTO t(x) VALUES (1)")))
        w(lambda: _publish_here(other))  # another file: nothing to wait for
        with pytest.raises(alkpubsub.PubSubError):
            w(lambda: _publish_here(_db(tmp_path)))
        w(s.commit)
        w(s.close)
        w(lambda: _publish_here(_db(tmp_path)))
    finally:
        w.stop()


def test_two_engines_two_files_same_thread(tmp_path):
    a, b = _engine(tmp_path, "a.db"), _engine(tmp_path, "b.db")
    w = _Worker()
    try:
        sa_, sb = w(lambda: Session(a)), w(lambda: Session(b))
        w(lambda: sa_.execute(text("INSERT INTO t(x) VALUES (1)")))
        w(lambda: sb.execute(text("INSERT INTO t(x) VALUES (2)")))
        w(sa_.commit)
        w(sa_.close)
        w(lambda: _publish_here(_db(tmp_path, "a.db")))  # a's transaction ended
        with pytest.raises(alkpubsub.PubSubError):
            w(lambda: _publish_here(_db(tmp_path, "b.db")))
        w(sb.rollback)
        w(sb.close)
        w(lambda: _publish_here(_db(tmp_path, "b.db")))
    finally:
        w.stop()
    assert _xs(a) == [1] and _xs(b) == []


def test_registry_clean_after_begin_failed_busy(tmp_path):
    engine = _engine(tmp_path)
    path = _db(tmp_path)
    holder = Session(engine)
    holder.execute(text("INSERT INTO t(x) VALUES (1)"))
    w = _Worker()
    try:

        def fails():
            with Session(engine) as s:
                s.execute(text("INSERT INTO t(x) VALUES (2)"))

        with pytest.raises(sa.exc.OperationalError):
            w(fails)
        holder.commit()
        holder.close()
        w(lambda: _publish_here(path))
        assert w.ident() not in open_store(path).shared.sqla_writers
    finally:
        w.stop()


def test_registry_clean_after_commit_failed(tmp_path):
    engine = _engine(tmp_path)
    path = _db(tmp_path)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE p (id INTEGER PRIMARY KEY)"))
        c.execute(
            text(
                "CREATE TABLE ch (id INTEGER PRIMARY KEY, "
                "pid INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    w = _Worker()
    try:

        def fails():
            with Session(engine) as s:
                s.execute(text("INSERT INTO ch(pid) VALUES (42)"))
                s.commit()

        with pytest.raises(sa.exc.IntegrityError):
            w(fails)
        w(lambda: _publish_here(path))
    finally:
        w.stop()


def test_registry_clean_after_begin_on_a_and_end_on_b(tmp_path):
    engine = _engine(tmp_path)
    path = _db(tmp_path)
    a, b = _Worker(), _Worker()
    try:
        s = a(lambda: Session(engine))
        a(lambda: s.execute(text("INSERT INTO t(x) VALUES (1)")))
        b(s.commit)
        b(s.close)
        a(lambda: _publish_here(path))
        b(lambda: _publish_here(path))
    finally:
        a.stop()
        b.stop()
    assert _xs(engine) == [1]


def test_registry_clean_after_leaked_session_collected_on_another_thread(tmp_path):
    engine = _engine(tmp_path)
    path = _db(tmp_path)
    a = _Worker()
    try:

        def leak():
            s = Session(engine)
            s.execute(text("INSERT INTO t(x) VALUES (1)"))
            s._cycle = s

        gc.disable()
        try:
            a(leak)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _bounded(gc.collect)
        finally:
            gc.enable()
        a(lambda: _publish_here(path))
    finally:
        a.stop()
    assert _xs(engine) == []


# -- RETURNING without rows: the text parser vs. the real names -----------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE t SET x = 'returning, x' WHERE {w} RETURNING id, x",
        'UPDATE t SET x = x WHERE {w} RETURNING x AS "a, b", id',
        "UPDATE t SET x = x WHERE {w} RETURNING t.x",
        "UPDATE t SET x = x WHERE {w} RETURNING x + 1",
        "UPDATE t SET x = x WHERE {w} RETURNING coalesce(x, 'a,b') AS c",
        "UPDATE t SET x = x WHERE {w} RETURNING x -- trailing comment",
        "UPDATE t SET x = x WHERE {w} RETURNING (x)",
        "UPDATE t SET x = x WHERE {w} RETURNING x alias",
        'UPDATE t SET x = x WHERE {w} RETURNING x "a,b"',
        "UPDATE t SET x = x WHERE {w} RETURNING *",
        "DELETE FROM t WHERE {w} RETURNING *",
        "WITH c AS (SELECT 1 AS v) UPDATE t SET x = (SELECT v FROM c) WHERE {w} RETURNING id",
        "INSERT INTO t(id, x) SELECT id + 100, x FROM t WHERE {w} RETURNING id, x",
    ],
)
def test_returning_keys_same_with_and_without_matching_rows(tmp_path, sql):
    engine = _engine(tmp_path)
    with engine.begin() as c:
        c.execute(text("INSERT INTO t(id, x) VALUES (1, 'v')"))
    with engine.connect() as c:
        matched = c.execute(text(sql.format(w="id = 1")))
        keys_matched = list(matched.keys())
        assert len(matched.all()) == 1
        c.rollback()
    with engine.connect() as c:
        empty = c.execute(text(sql.format(w="id = -1")))
        assert list(empty.keys()) == keys_matched
        assert empty.all() == []
        c.rollback()


def test_returning_with_zero_rows_does_not_run_the_statement_twice(tmp_path):
    """The probe wraps reading statements; a WITH ... DML must never run twice."""
    engine = _engine(tmp_path)
    with engine.begin() as c:
        r = c.execute(
            text("WITH c AS (SELECT 7 AS v) INSERT INTO t(x) SELECT v FROM c WHERE v > 100")
        )
        assert r.rowcount == 0
        c.execute(text("WITH c AS (SELECT 7 AS v) INSERT INTO t(x) SELECT v FROM c"))
    assert _xs(engine) == [7]


# -- parameters: SQLAlchemy's standard types through the ORM --------------------------------


class Color(enum.Enum):
    red = "r"
    blue = "b"


class Base(DeclarativeBase):
    pass


class Everything(Base):
    __tablename__ = "everything"
    id: Mapped[int] = mapped_column(primary_key=True)
    flag = mapped_column(sa.Boolean)
    color = mapped_column(sa.Enum(Color))
    plain_enum = mapped_column(sa.Enum("a", "b", name="ab"))
    span = mapped_column(sa.Interval)
    uid = mapped_column(sa.Uuid)
    uid_str = mapped_column(sa.Uuid(as_uuid=False))
    day = mapped_column(sa.Date)
    clock = mapped_column(sa.Time)
    at = mapped_column(sa.DateTime)
    at_tz = mapped_column(sa.DateTime(timezone=True))
    amount = mapped_column(sa.Numeric(12, 4, asdecimal=True))
    ratio = mapped_column(sa.Float(asdecimal=True))
    big = mapped_column(sa.BigInteger)
    blob = mapped_column(sa.LargeBinary)
    pickled = mapped_column(sa.PickleType)
    doc = mapped_column(sa.JSON)
    doc_none = mapped_column(sa.JSON(none_as_null=True))
    sdoc = mapped_column(sa.dialects.sqlite.JSON)
    uni = mapped_column(sa.Unicode(20))


def test_orm_standard_types_round_trip(tmp_path):
    engine = _engine(tmp_path)
    Base.metadata.create_all(engine)
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    at = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456)
    values = dict(
        flag=False,
        color=Color.blue,
        plain_enum="b",
        span=datetime.timedelta(days=3, seconds=5, microseconds=7),
        uid=u,
        uid_str=str(u),
        day=at.date(),
        clock=datetime.time(1, 2, 3, 4),
        at=at,
        at_tz=at,
        amount=decimal.Decimal("1234.5678"),
        ratio=decimal.Decimal("0.25"),
        big=2**62,
        blob=b"\x00\x01\xff",
        pickled={"k": (1, 2), "s": {3}},
        doc={"a": [1, None, "é"]},
        doc_none=None,
        sdoc=[1, {"b": 2}],
        uni="héllo",
    )
    with Session(engine) as s:
        s.add(Everything(id=1, **values))
        s.commit()
    with Session(engine) as s:
        got = s.get(Everything, 1)
        for name, want in values.items():
            assert getattr(got, name) == want, name
        # and queries filtering on them bind the same way
        assert s.scalars(sa.select(Everything.id).where(Everything.uid == u)).all() == [1]
        assert s.scalars(sa.select(Everything.id).where(Everything.at == at)).all() == [1]
        assert s.scalars(sa.select(Everything.id).where(Everything.color == Color.blue)).all() == [
            1
        ]
        assert s.scalars(
            sa.select(Everything.id).where(Everything.amount == decimal.Decimal("1234.5678"))
        ).all() == [1]
        assert s.scalars(sa.select(Everything.id).where(Everything.flag.is_(False))).all() == [1]


async def test_async_orm_standard_types_round_trip(tmp_path):
    engine = create_async_engine(_db(tmp_path))
    try:
        async with asyncio.timeout(20):
            async with engine.begin() as c:
                await c.run_sync(Base.metadata.create_all)
            u = uuid.uuid4()
            async with AsyncSession(engine) as s:
                s.add(Everything(id=2, uid=u, span=datetime.timedelta(seconds=1), color=Color.red))
                await s.commit()
            async with AsyncSession(engine) as s:
                got = await s.get(Everything, 2)
                assert got.uid == u and got.span == datetime.timedelta(seconds=1)
                assert got.color is Color.red
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "value",
    [
        datetime.datetime(2024, 1, 2, 3, 4, 5),
        datetime.date(2024, 1, 2),
        datetime.time(3, 4),
        datetime.timedelta(seconds=3),
        decimal.Decimal("1.10"),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        {"a": 1},
        [1, 2],
        Color.red,
        object(),
    ],
    ids=lambda v: type(v).__name__,
)
def test_raw_unbindable_parameter_is_data_error_and_stores_nothing(tmp_path, value):
    engine = _engine(tmp_path)
    with engine.connect() as c:
        c.execute(text("INSERT INTO t(x) VALUES (1)"))
        with pytest.raises(sa.exc.DataError) as info:
            c.exec_driver_sql("INSERT INTO t(x) VALUES (?)", (value,))
        msg = str(info.value)
        assert type(value).__name__ in msg and "SQLAlchemy" in msg, msg
        with pytest.raises(sa.exc.DataError):
            c.execute(text("INSERT INTO t(x) VALUES (:v)"), {"v": value})
        c.commit()
    assert _xs(engine) == [1]


def test_int_and_str_subclasses_bind_as_their_values(tmp_path):
    class Level(enum.IntEnum):
        high = 3

    class Name(enum.StrEnum):
        bob = "bob"

    engine = _engine(tmp_path)
    with engine.begin() as c:
        c.exec_driver_sql("INSERT INTO t(x) VALUES (?)", (Level.high,))
        c.exec_driver_sql("INSERT INTO t(x) VALUES (?)", (Name.bob,))
    assert _xs(engine) == [3, "bob"]


# -- concurrency and performance -----------------------------------------------------------


def test_mixed_load_every_row_and_event_exactly_once(tmp_path):
    """50 threads of short sessions (each publishing an event through
    store_transaction), an AsyncSession writer and a transport publisher on the
    same file, for ~3 s: every committed row and event is there exactly once,
    no DatabaseBusy with busy_timeout=5, nothing hangs."""
    path = _db(tmp_path)
    engine = _engine(tmp_path, busy=5.0, pool_size=60, max_overflow=10)
    stop = threading.Event()
    errors: list = []
    committed_rows: list = []
    committed_events: list = []
    lock = threading.Lock()

    def sync_worker(i):
        n = 0
        try:
            while not stop.is_set():
                key = f"s{i}-{n}"
                with Session(engine) as s:
                    s.execute(text("INSERT INTO t(x) VALUES (:x)"), {"x": key})
                    store_transaction(s).publish("load:sync", {"k": key})
                    s.commit()
                with lock:
                    committed_rows.append(key)
                    committed_events.append(key)
                n += 1
        except BaseException as exc:
            errors.append(exc)

    def async_side():
        async def main():
            aengine = create_async_engine(path, connect_args={"busy_timeout": 5.0})
            transport = await alkpubsub.connect(f"honker+durable://{path}")
            try:

                async def writer():
                    n = 0
                    while not stop.is_set():
                        key = f"a-{n}"
                        async with AsyncSession(aengine) as s:
                            await s.execute(text("INSERT INTO t(x) VALUES (:x)"), {"x": key})
                            await s.commit()
                        with lock:
                            committed_rows.append(key)
                        n += 1

                async def publisher():
                    n = 0
                    while not stop.is_set():
                        key = f"p-{n}"
                        await transport.publish("load:pub", {"k": key})
                        with lock:
                            committed_events.append(key)
                        n += 1

                async with asyncio.timeout(60):
                    await asyncio.gather(writer(), publisher())
            finally:
                await transport.close()
                await aengine.dispose()

        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sync_worker, args=(i,), daemon=True) for i in range(50)]
    threads.append(threading.Thread(target=async_side, daemon=True))
    t0 = time.monotonic()
    for th in threads:
        th.start()
    time.sleep(3.0)
    stop.set()
    for th in threads:
        th.join(60)
        assert not th.is_alive(), "a worker hung"
    elapsed = time.monotonic() - t0
    assert errors == [], errors[:3]
    rows = _xs(engine)
    assert sorted(rows) == sorted(committed_rows)
    assert len(set(rows)) == len(rows)
    store = open_store(path)
    try:
        stored = store.honker.query("SELECT payload FROM _honker_stream", [])
    finally:
        store.close()
    import json

    keys = []
    for r in stored:
        p = r["payload"]
        doc = json.loads(p) if isinstance(p, str) else p
        keys.append(_find_key(doc))
    assert sorted(keys) == sorted(committed_events)
    sync_n = sum(1 for k in committed_rows if k.startswith("s"))
    async_n = sum(1 for k in committed_rows if k.startswith("a"))
    pub_n = sum(1 for k in committed_events if k.startswith("p"))
    print(
        f"\nMIXED: {elapsed:.2f}s sync sessions={sync_n} ({sync_n / elapsed:.0f}/s) "
        f"async sessions={async_n} ({async_n / elapsed:.0f}/s) publishes={pub_n} "
        f"({pub_n / elapsed:.0f}/s)"
    )
    assert sync_n > 0 and async_n > 0 and pub_n > 0


def _find_key(doc):
    if isinstance(doc, dict):
        if "k" in doc and isinstance(doc["k"], str):
            return doc["k"]
        for v in doc.values():
            found = _find_key(v)
            if found is not None:
                return found
    if isinstance(doc, str):
        import json

        try:
            return _find_key(json.loads(doc))
        except ValueError:
            return None
    return None


def test_orm_insert_commit_not_pathologically_slower_than_raw_store(tmp_path):
    """2,000 single-row ORM insert+commit sessions through sqlite+honker, vs the
    raw store.transaction() path, vs the same ORM code over Python's sqlite3 on
    ANOTHER file (SQLAlchemy's own cost). The home-thread hop must not make the
    honker path more than 5x slower than SQLAlchemy over sqlite3."""
    n = 2000

    class B2(DeclarativeBase):
        pass

    class Row(B2):
        __tablename__ = "rows"
        id: Mapped[int] = mapped_column(primary_key=True)
        v: Mapped[int]

    def orm_run(engine):
        B2.metadata.create_all(engine)
        t0 = time.perf_counter()
        for i in range(n):
            with Session(engine) as s:
                s.add(Row(v=i))
                s.commit()
        return time.perf_counter() - t0

    engine = _engine(tmp_path, busy=5.0)
    orm = orm_run(engine)
    store = open_store(_db(tmp_path))
    try:
        t0 = time.perf_counter()
        for i in range(n):
            with store.transaction() as tx:
                tx.execute("INSERT INTO rows(v) VALUES (?)", [i])
        raw = time.perf_counter() - t0
    finally:
        store.close()
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM rows")).scalar() == 2 * n
    # the same ORM code over sqlite3 on a different file, WAL + synchronous=NORMAL
    # like honker
    plain = sa.create_engine(f"sqlite:///{tmp_path / 'plain.db'}")

    @event.listens_for(plain, "connect")
    def wal(dbapi_connection, record):
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    base = orm_run(plain)
    plain.dispose()
    print(
        f"\nPERF: ORM/honker {n / orm:.0f} sessions/s ({orm * 1e3 / n:.3f} ms); raw "
        f"store.transaction {n / raw:.0f} tx/s ({raw * 1e3 / n:.3f} ms); ORM/sqlite3 "
        f"{n / base:.0f} sessions/s ({base * 1e3 / n:.3f} ms); honker/raw {orm / raw:.1f}x, "
        f"honker/sqlite3 {orm / base:.2f}x"
    )
    assert orm / base < 5, f"ORM over honker {orm / base:.1f}x slower than over sqlite3"


def test_gc_of_a_leaked_session_on_its_own_home_thread(tmp_path):
    engine = _engine(tmp_path)
    keep = open_store(_db(tmp_path), busy_timeout=BUSY)
    holder: dict = {}

    def leak():
        s = Session(engine)
        s.execute(text("INSERT INTO t(x) VALUES (1)"))
        holder["executor"] = s.connection().connection.dbapi_connection.session.executor()
        s._cycle = s

    gc.disable()
    try:
        _bounded(leak)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            holder.pop("executor").submit(gc.collect).result(10)
    finally:
        gc.enable()
    try:
        assert _write_ok(engine) < BUSY
        assert _xs(engine) == [12345]
    finally:
        keep.close()


async def test_async_session_write_inside_atransaction_on_same_loop_fails_fast(tmp_path):
    """honker_guard refuses at once a SQLAlchemy write asked for on a loop whose
    async store transaction is open (it could only wait for it). Through the
    async dialect the begin runs on the home thread, where no loop runs."""
    path = _db(tmp_path)
    engine = create_async_engine(path, connect_args={"busy_timeout": 3.0})
    store = open_store(path, busy_timeout=3.0)
    try:
        async with asyncio.timeout(20):
            async with engine.begin() as c:
                await c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, x)"))
            async with store.atransaction() as tx:
                await tx.execute("INSERT INTO t(x) VALUES (1)")
                t0 = time.monotonic()
                with pytest.raises(sa.exc.DBAPIError):
                    async with AsyncSession(engine) as s:
                        await s.execute(text("INSERT INTO t(x) VALUES (2)"))
                waited = time.monotonic() - t0
        assert waited < 1.0, f"waited {waited:.2f} s (busy_timeout) before refusing"
    finally:
        store.close()
        await engine.dispose()


def test_keyboard_interrupt_during_a_long_statement_rolls_back_and_frees_the_gate(tmp_path):
    script = f"""
        import signal, threading, time, sys, os
        from sqlalchemy import text
        from sqlalchemy.orm import Session
        from alkpubsub.storage.sqlalchemy import create_engine
        engine = create_engine({_db(tmp_path)!r}, connect_args={{"busy_timeout": 3.0}})
        with engine.begin() as c:
            c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, x)"))
        def on_alarm(*a):
            raise KeyboardInterrupt
        signal.signal(signal.SIGALRM, on_alarm)
        s = Session(engine)
        s.execute(text("INSERT INTO t(x) VALUES (1)"))
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        try:
            s.execute(text(
                "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5000000) "
                "INSERT INTO t(x) SELECT count(*) FROM r"))
            print("NO-INTERRUPT")
        except KeyboardInterrupt:
            print("INTERRUPTED")
        try:
            s.close()
        except BaseException as exc:
            print("CLOSE-ERR", type(exc).__name__)
        box = {{}}
        def later():
            try:
                with Session(engine) as s2:
                    s2.execute(text("INSERT INTO t(x) VALUES (3)"))
                    s2.commit()
                box["ok"] = True
            except BaseException as exc:
                box["err"] = repr(exc)[:300]
        th2 = threading.Thread(target=later, daemon=True); th2.start(); th2.join(15)
        print("LATER", box)
        with engine.connect() as c:
            print("ROWS", [r[0] for r in c.execute(text("SELECT x FROM t ORDER BY id"))])
        sys.stdout.flush()
        os._exit(0)
    """
    out = _run_script(script, timeout=60)
    assert "INTERRUPTED" in out.stdout, (out.stdout, out.stderr[-2000:])
    assert "LATER {'ok': True}" in out.stdout, (out.stdout, out.stderr[-2000:])
    assert "ROWS [3]" in out.stdout, out.stdout


def test_engine_dropped_without_dispose_does_not_leak_the_store(tmp_path):
    """An Engine garbage-collected without dispose() (a test suite's fixture,
    a script): over sqlite3 its connections close when collected. Here each
    left-open store keeps honker's database and a writer thread for ever."""
    script = f"""
        import gc, threading, time, os
        from sqlalchemy import text
        from sqlalchemy.orm import Session
        from alkpubsub.storage.sqlalchemy import create_engine
        from alkpubsub.storage import shared
        before = threading.active_count()
        for i in range(20):
            e = create_engine(os.path.join({str(tmp_path)!r}, f"f{{i}}.db"))
            with e.begin() as c:
                c.execute(text("CREATE TABLE t (x)"))
            with Session(e) as s:
                s.execute(text("INSERT INTO t VALUES (1)"))
                s.commit()
            del e, c, s
        for _ in range(20):
            gc.collect(); time.sleep(0.1)
        # The driver's one janitor thread per process (it closes connections the
        # collector found unclosed) is not a leak: count the others.
        janitors = [t for t in threading.enumerate() if t.name == "alkpubsub-janitor"]
        print("THREADS", threading.active_count() - before - len(janitors))
        print("OPEN", len(shared._registry))
    """
    out = _run_script(script, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OPEN 0" in out.stdout and "THREADS 0" in out.stdout, out.stdout
