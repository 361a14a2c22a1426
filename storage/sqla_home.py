"""The write transaction of one SQLAlchemy DB-API connection, kept on a thread
of its own.

SQLAlchemy may drive one connection from several threads and contexts: a
``Session`` used through ``asyncio.to_thread`` step by step, a FastAPI sync
endpoint and its dependency's teardown in different threadpool calls, the pool
rolling a connection back on whichever thread the garbage collector runs. A
store transaction cannot follow it there: honker counts open transactions per
thread (one begun on thread A and ended on B leaves A unable to write again),
and ``store.transaction()`` keeps a context variable that cannot be reset from
another context. So every statement of a write transaction, its ``BEGIN`` and
its end run on the connection's home thread, whichever thread asks; the caller
waits (a sync caller blocks as it would on SQLite; the async dialect awaits the
home thread without blocking the loop).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from alkpubsub.errors import Closed, PubSubError

from .sqlerrors import run_sql
from .store import Store
from .transaction import StoreTransaction

T = TypeVar("T")


class _Rollback(Exception):
    """Thrown into honker's transaction to roll it back."""


class WriteSession:
    """At most one open write transaction of a connection, on its home thread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tx: StoreTransaction | None = None
        self.generation = 0
        self._guard: Any = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._home: int | None = None
        self._opener = 0
        self._lock = threading.Lock()
        _sessions.add(self)

    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """The home thread (created on first use)."""
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="alkpubsub-sqla"
                )
                self._home = self._executor.submit(threading.get_ident).result()
            return self._executor

    def on_home(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the home thread; the caller waits for it. A caller
        interrupted while waiting (KeyboardInterrupt, a timeout signal) cancels
        ``fn`` if it has not started, else waits for it to finish, so the
        session's state (a transaction begun, the gate held) is known when the
        interrupt propagates: the caller's cleanup can then end it."""
        if threading.get_ident() == self._home:
            return fn()
        future = self.executor().submit(fn)
        try:
            return future.result()
        except BaseException:
            if not future.cancel():
                concurrent.futures.wait([future])
            raise

    def begin(self) -> StoreTransaction:
        """The open transaction, begun now (gate, then honker's BEGIN IMMEDIATE)
        if there is none."""
        return self.within(lambda tx: tx)

    def within(self, fn: Callable[[StoreTransaction], T]) -> T:
        """``fn(tx)`` on the home thread in the open transaction, begun first if
        there is none (in the same hop)."""
        if self.tx is not None:
            tx = self.tx
            return self.on_home(lambda: fn(tx))
        opener = self._check_can_begin()
        return self.on_home(lambda: fn(self.tx if self.tx is not None else self._begin(opener)))

    def _check_can_begin(self) -> int:
        store = self.store
        if store.closed:
            raise Closed(f"the store for {store.path!r} is closed; open_store() it again")
        shared = store.shared
        # On the caller's thread: a write asked for on an event loop's thread
        # while an async store transaction of that loop is open would wait for
        # it forever (see honker_guard).
        shared.sessions.check(shared.path, "a SQLAlchemy write transaction")
        if shared.gate.held_here():
            raise PubSubError(
                f"a store transaction on {store.path!r} is open in this thread, and a SQLAlchemy "
                "write would wait for it forever; write through that transaction's tx, or "
                "after it"
            )
        return threading.get_ident()

    def _begin(self, opener: int) -> StoreTransaction:
        """On the home thread: take the gate and begin. ``opener`` is the thread
        that asked (a transport publish from it would wait for this transaction)."""
        shared = self.store.shared
        shared.gate.acquire()
        try:
            guard = shared.db.transaction()
            native = run_sql(guard.__enter__, "BEGIN IMMEDIATE")
        except BaseException:
            shared.gate.release()
            raise
        self._guard = guard
        self._opener = opener
        writers = shared.sqla_writers
        writers[opener] = writers.get(opener, 0) + 1
        self.generation += 1
        self.tx = StoreTransaction(HomeBound(native, self, self.generation), self.store.origin)
        return self.tx

    def end(self, *, commit: bool) -> None:
        """Commit or roll back the open transaction and release the gate; nothing
        if none is open. A failed COMMIT (a deferred foreign key) rolls back and
        raises the typed error."""
        guard, self._guard, self.tx = self._guard, None, None
        if guard is None:
            return
        shared = self.store.shared
        writers, opener = shared.sqla_writers, self._opener
        if writers.get(opener, 0) > 1:
            writers[opener] -= 1
        else:
            writers.pop(opener, None)

        def finish() -> None:
            try:
                if commit:
                    run_sql(lambda: guard.__exit__(None, None, None), "COMMIT")
                else:
                    with contextlib.suppress(_Rollback):
                        guard.__exit__(_Rollback, _Rollback(), None)
            finally:
                shared.gate.release()

        self.on_home(finish)
        if commit:
            shared.after_commit({}, True)

    def close(self) -> None:
        """Roll back what is open and stop the home thread."""
        try:
            self.end(commit=False)
        finally:
            with self._lock:
                executor, self._executor = self._executor, None
            if executor is not None:
                here = threading.get_ident() == self._home
                executor.shutdown(wait=not here, cancel_futures=True)
                self._home = None
            if self._guard is not None:
                # A begin that was already running when close() came: end it here.
                self.end(commit=False)

    def after_fork(self) -> None:
        """In a forked child: the home thread did not survive the fork, and a
        transaction the parent had open is the parent's to end."""
        self._executor = None
        self._home = None
        self._guard = None
        self.tx = None


_sessions: weakref.WeakSet[WriteSession] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for session in list(_sessions):
        session.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class HomeBound:
    """honker's transaction as ``StoreTransaction.honker`` sees it: each call runs
    on the home thread, and only while that same transaction is open."""

    __slots__ = ("_generation", "_native", "_session")

    def __init__(self, native: Any, session: WriteSession, generation: int) -> None:
        self._native = native
        self._session = session
        self._generation = generation

    def execute(self, sql: str, params: Any = None) -> None:
        self._call(lambda: self._native.execute(sql, params))

    def query(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call(lambda: self._native.query(sql, params))
        return rows

    def notify(self, channel: str, payload: Any) -> Any:
        return self._call(lambda: self._native.notify(channel, payload))

    def _call(self, fn: Callable[[], T]) -> T:
        session = self._session
        if session.tx is None or session.generation != self._generation:
            raise Closed(
                "this store transaction ended with its session's commit or rollback; take "
                "store_transaction(session) again in the transaction that should hold the write"
            )
        return session.on_home(fn)
