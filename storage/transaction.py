"""Transactions that write rows and publish events in the same commit.

Events are written with the same JSON envelope every transport uses: durable
events as rows of honker's ``_honker_stream`` (``topic`` column = the stream
name, ``payload`` = the envelope), ephemeral ones as rows of
``_honker_notifications`` (``channel`` = the event's topic). Both become
visible to subscribers exactly when the transaction commits.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from alkpubsub.errors import ConfigError
from alkpubsub.event import Event
from alkpubsub.limits import MAX_PAYLOAD_BYTES, check_headers, check_key
from alkpubsub.topics import validate_publish_topic

from .honker_ops import (
    DEFAULT_MAX_ATTEMPTS,
    ENQUEUE,
    LOCK_ACQUIRE,
    LOCK_RELEASE,
    LOCK_RENEW,
    SCHEDULE,
    UNSCHEDULE,
    enqueue_args,
    lock_args,
    schedule_args,
)
from .honker_ops import schedule_name as _schedule_name
from .sqlerrors import run_sql

T = TypeVar("T")


class TransactionRunner(Protocol):
    """What runs an async transaction's work: the writer's session, or an
    async SQLAlchemy connection's thread (``storage.sqla_dialect``)."""

    @property
    def origin(self) -> str: ...

    def run(self, fn: Callable[[StoreTransaction], Any]) -> Awaitable[Any]: ...


DEFAULT_STREAM = "events"
INSERT_STREAM = "INSERT INTO _honker_stream (topic, key, payload) VALUES (?, ?, ?)"
INSERT_NOTIFICATION = "INSERT INTO _honker_notifications (channel, payload) VALUES (?, ?)"

# Multi-row INSERTs for the group-commit writer (see insert_rows).
_CHUNKS = (64, 8, 1)


def _multi_row(sql: str, columns: int, rows: int) -> str:
    return sql + (", (" + ", ".join("?" * columns) + ")") * (rows - 1)


STREAM_SQL: dict[int, tuple[str, int]] = {n: (_multi_row(INSERT_STREAM, 3, n), 3) for n in _CHUNKS}
NOTIFY_SQL: dict[int, tuple[str, int]] = {
    n: (_multi_row(INSERT_NOTIFICATION, 2, n), 2) for n in _CHUNKS
}


def insert_rows(
    execute: Callable[..., Any], sqls: dict[int, tuple[str, int]], flat: list[Any]
) -> int:
    """Insert the rows whose parameters are ``flat``, in statements of 64, 8 and 1
    rows (few distinct statements, so honker's statement cache keeps them all).
    Returns the number of rows."""
    width = sqls[1][1]
    total = len(flat) // width
    done = 0
    for size in _CHUNKS:
        sql, _ = sqls[size]
        step = size * width
        while total - done >= size:
            start = done * width
            execute(sql, flat[start : start + step])
            done += size
    return total


_STREAM_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")

Params = Sequence[Any]


def check_stream_name(stream: str) -> str:
    """Stream names are 1..128 characters of ``[A-Za-z0-9_.:-]``; raise :class:`ConfigError`."""
    if not isinstance(stream, str) or not _STREAM_NAME.fullmatch(stream):
        raise ConfigError(
            f"stream={stream!r} must be 1..128 characters of [A-Za-z0-9_.:-]; rename it"
        )
    return stream


def build_event(
    topic: str,
    payload: Any,
    *,
    origin: str,
    headers: dict[str, str] | None = None,
    key: str | None = None,
) -> tuple[Event, str]:
    """A new event and its envelope text, validated like a transport's publish
    (topic, payload limits, headers, key; :mod:`alkpubsub.limits`)."""
    validate_publish_topic(topic)
    if headers is not None:
        headers = check_headers(headers)
    check_key(key)
    event, body = Event.create(
        topic, payload, origin=origin, headers=headers, key=key, max_bytes=MAX_PAYLOAD_BYTES
    )
    return event, event.envelope(body).decode()


class StoreTransaction:
    """One open write transaction (``with store.transaction() as tx``).

    Everything done through it commits together; an exception rolls all of it
    back, events included. ``tx.honker`` is honker's own transaction, to pass
    as ``tx=`` to honker queues and streams.
    """

    __slots__ = ("honker", "origin")

    def __init__(self, honker_tx: Any, origin: str) -> None:
        self.honker = honker_tx
        self.origin = origin

    def execute(self, sql: str, params: Params = ()) -> None:
        """Run one SQL statement. SQLite's errors are raised as
        :class:`~alkpubsub.StorageError` subclasses (``ConstraintViolation``,
        ``SQLError``, ``DatabaseBusy``)."""
        args = list(params)
        run_sql(lambda: self.honker.execute(sql, args), sql)

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        """Run one SQL statement and return its rows as dicts (sees this
        transaction's writes); errors as in :meth:`execute`."""
        args = list(params)
        rows: list[dict[str, Any]] = run_sql(lambda: self.honker.query(sql, args), sql)
        return rows

    def publish(
        self,
        topic: str,
        payload: Any,
        *,
        stream: str = DEFAULT_STREAM,
        headers: dict[str, str] | None = None,
        key: str | None = None,
    ) -> Event:
        """Append a durable event to ``stream`` (read by ``honker+durable://...?stream=``).
        Returns the event with its ``offset``."""
        check_stream_name(stream)
        event, text = build_event(topic, payload, origin=self.origin, headers=headers, key=key)
        return event.with_offset(self.append(stream, key, text))

    def notify(self, topic: str, payload: Any, *, headers: dict[str, str] | None = None) -> Event:
        """Publish an ephemeral event to live ``honker://`` subscribers of ``topic``."""
        event, text = build_event(topic, payload, origin=self.origin, headers=headers)
        self.honker.execute(INSERT_NOTIFICATION, [topic, text])
        return event

    def append(self, stream: str, key: str | None, text: str) -> int:
        """Append an already encoded envelope to ``stream``; return its offset."""
        rows = self.honker.query(INSERT_STREAM + " RETURNING offset", [stream, key, text])
        return int(rows[0]["offset"])

    # -- honker's queues, locks and scheduler, in this transaction ------------

    def enqueue(
        self,
        queue: str,
        payload: Any,
        *,
        delay: float | None = None,
        run_at: float | None = None,
        priority: int = 0,
        expires: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> int:
        """Add a job to honker queue ``queue`` in this transaction; return its id.
        A worker (honker's ``db.queue(queue).claim(...)``, any process) can claim
        it once the transaction commits, never before, and never if it rolls back.
        ``delay``/``run_at`` (unix seconds) defer it; ``expires`` (seconds) bounds
        how long it stays claimable."""
        args = enqueue_args(
            queue,
            payload,
            delay=delay,
            run_at=run_at,
            priority=priority,
            expires=expires,
            max_attempts=max_attempts,
        )
        return int(self.query(ENQUEUE, args)[0]["id"])

    def acquire_lock(self, name: str, *, owner: str, ttl: int = 60) -> bool:
        """Take honker lock ``name`` for ``owner`` for ``ttl`` seconds, in this
        transaction (it counts only once committed); False if another owner
        holds it. The same lock ``db.lock(name)`` uses."""
        return bool(self.query(LOCK_ACQUIRE, lock_args(name, owner, ttl))[0]["r"])

    def renew_lock(self, name: str, *, owner: str, ttl: int = 60) -> bool:
        """Extend ``owner``'s hold on ``name``; False if it no longer holds it."""
        return bool(self.query(LOCK_RENEW, lock_args(name, owner, ttl))[0]["r"])

    def release_lock(self, name: str, *, owner: str) -> None:
        """Release ``owner``'s hold on lock ``name`` (nothing if it holds none)."""
        self.query(LOCK_RELEASE, lock_args(name, owner))

    def schedule(
        self,
        name: str,
        *,
        queue: str,
        cron: str,
        payload: Any = None,
        priority: int = 0,
        expires: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        """Register (or replace) periodic job ``name``: honker's scheduler
        enqueues ``payload`` on ``queue`` at every boundary of ``cron`` (a 5- or
        6-field cron expression, or ``@every 30s``). Needs a honker scheduler
        running somewhere (``honker.Scheduler(db).run()``)."""
        self.query(
            SCHEDULE,
            schedule_args(
                name,
                queue=queue,
                cron=cron,
                payload=payload,
                priority=priority,
                expires=expires,
                max_attempts=max_attempts,
            ),
        )

    def unschedule(self, name: str) -> bool:
        """Remove periodic job ``name``; True if it existed."""
        return bool(self.query(UNSCHEDULE, [_schedule_name(name)])[0]["n"])


class AsyncStoreTransaction:
    """``async with store.atransaction() as tx``: the same operations as
    :class:`StoreTransaction`, awaited. The SQL runs on the database's writer
    thread, which holds the transaction open until the block ends; the event
    loop never waits on SQLite.

    Do not await a transport's ``publish`` on the same database inside the
    block: the writer is busy with this transaction, so that publish would wait
    for it forever. Use ``tx.publish`` / ``tx.notify`` instead.
    """

    __slots__ = ("_session", "origin")

    def __init__(self, session: TransactionRunner) -> None:
        self._session = session
        self.origin = session.origin

    async def run(self, fn: Callable[[StoreTransaction], T]) -> T:
        """Run ``fn(tx)`` on the writer thread inside this transaction (several
        statements for the price of one hop)."""
        result: T = await self._session.run(fn)
        return result

    async def execute(self, sql: str, params: Params = ()) -> None:
        """Run one SQL statement."""
        await self.run(lambda tx: tx.execute(sql, params))

    async def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        """Run one SQL statement and return its rows as dicts."""
        return await self.run(lambda tx: tx.query(sql, params))

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        stream: str = DEFAULT_STREAM,
        headers: dict[str, str] | None = None,
        key: str | None = None,
    ) -> Event:
        """Append a durable event to ``stream``; see :meth:`StoreTransaction.publish`."""
        check_stream_name(stream)
        event, text = build_event(topic, payload, origin=self.origin, headers=headers, key=key)
        offset = await self.run(lambda tx: tx.append(stream, key, text))
        return event.with_offset(offset)

    async def notify(
        self, topic: str, payload: Any, *, headers: dict[str, str] | None = None
    ) -> Event:
        """Publish an ephemeral event; see :meth:`StoreTransaction.notify`."""
        event, text = build_event(topic, payload, origin=self.origin, headers=headers)
        await self.run(lambda tx: tx.honker.execute(INSERT_NOTIFICATION, [topic, text]))
        return event

    async def enqueue(
        self,
        queue: str,
        payload: Any,
        *,
        delay: float | None = None,
        run_at: float | None = None,
        priority: int = 0,
        expires: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> int:
        """Add a job to honker queue ``queue``; see :meth:`StoreTransaction.enqueue`."""
        args = enqueue_args(
            queue,
            payload,
            delay=delay,
            run_at=run_at,
            priority=priority,
            expires=expires,
            max_attempts=max_attempts,
        )
        return await self.run(lambda tx: int(tx.query(ENQUEUE, args)[0]["id"]))

    async def acquire_lock(self, name: str, *, owner: str, ttl: int = 60) -> bool:
        """See :meth:`StoreTransaction.acquire_lock`."""
        args = lock_args(name, owner, ttl)
        return await self.run(lambda tx: bool(tx.query(LOCK_ACQUIRE, args)[0]["r"]))

    async def renew_lock(self, name: str, *, owner: str, ttl: int = 60) -> bool:
        """See :meth:`StoreTransaction.renew_lock`."""
        args = lock_args(name, owner, ttl)
        return await self.run(lambda tx: bool(tx.query(LOCK_RENEW, args)[0]["r"]))

    async def release_lock(self, name: str, *, owner: str) -> None:
        """See :meth:`StoreTransaction.release_lock`."""
        args = lock_args(name, owner)
        await self.run(lambda tx: tx.query(LOCK_RELEASE, args))

    async def schedule(
        self,
        name: str,
        *,
        queue: str,
        cron: str,
        payload: Any = None,
        priority: int = 0,
        expires: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        """See :meth:`StoreTransaction.schedule`."""
        args = schedule_args(
            name,
            queue=queue,
            cron=cron,
            payload=payload,
            priority=priority,
            expires=expires,
            max_attempts=max_attempts,
        )
        await self.run(lambda tx: tx.query(SCHEDULE, args))

    async def unschedule(self, name: str) -> bool:
        """See :meth:`StoreTransaction.unschedule`."""
        args = [_schedule_name(name)]
        return await self.run(lambda tx: bool(tx.query(UNSCHEDULE, args)[0]["n"]))
