"""SQLAlchemy 2.x over a Honker store: ORM sessions and Core statements in the
same commit as the events and jobs they describe.

.. code-block:: python

    from sqlalchemy.orm import Session
    from alkpubsub.storage.sqlalchemy import create_engine, store_transaction

    engine = create_engine("app.db")              # or "sqlite+honker:///app.db"
    with Session(engine) as session:
        session.add(Order(ref="A-1"))
        tx = store_transaction(session)           # the session's own write transaction
        tx.publish("orders:created", {"ref": "A-1"})
        tx.enqueue("send-receipt", {"ref": "A-1"})
        session.commit()                          # row, event and job: one commit

Async code uses :func:`create_async_engine` and ``AsyncSession`` (each pooled
connection runs its SQL on a thread of its own; the loop never waits on
SQLite) with :func:`async_store_transaction`. The dialect is SQLAlchemy's own
SQLite dialect (``name == "sqlite"``: Alembic's SQLite support applies) over a
driver that reaches the file only through honker; see
:mod:`alkpubsub.storage.sqla_dbapi` for how statements are routed.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import sqlalchemy
from sqlalchemy.dialects import registry
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
from sqlalchemy.orm import Session

from alkpubsub.errors import Closed, ConfigError

from .sqla_dbapi import Connection as DriverConnection
from .sqla_dialect import AsyncAdaptedConnection, HonkerAsyncDialect, HonkerDialect
from .store import Store
from .transaction import AsyncStoreTransaction, StoreTransaction

T = TypeVar("T")

registry.register("sqlite.honker", __name__.rsplit(".", 1)[0] + ".sqla_dialect", "HonkerDialect")
registry.register(
    "sqlite.honker_async", __name__.rsplit(".", 1)[0] + ".sqla_dialect", "HonkerAsyncDialect"
)


def url(database: str | os.PathLike[str] | Store, *, driver: str = "honker") -> str:
    """The SQLAlchemy URL of a Honker file (``sqlite+honker:///<path>``)."""
    path = database.path if isinstance(database, Store) else os.fspath(database)
    if not path:
        raise ConfigError("name the Honker database file (honker cannot use :memory:)")
    return f"sqlite+{driver}:///{path}"


def _engine_args(
    database: str | os.PathLike[str] | Store, begin: str | None, kwargs: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    if begin is not None and begin not in ("deferred", "immediate"):
        raise ConfigError(f"begin={begin!r}: use 'deferred' or 'immediate'")
    connect_args = dict(kwargs.pop("connect_args", {}))
    if isinstance(database, Store):
        connect_args.setdefault("origin", database.origin)
    text = "" if isinstance(database, Store) else os.fspath(database)
    target = text if text.startswith("sqlite+honker") else url(database)
    if begin is not None:
        if "begin" in make_url(target).query:
            raise ConfigError(f"begin= given twice: in the URL and as begin={begin!r}")
        connect_args["begin"] = begin
    kwargs["connect_args"] = connect_args
    return target, kwargs


def create_engine(
    database: str | os.PathLike[str] | Store, *, begin: str | None = None, **kwargs: Any
) -> Engine:
    """An Engine on the Honker file ``database`` (a path, a ``sqlite+honker://``
    URL, or an open :class:`Store`, whose events' ``origin`` it keeps).

    ``begin="deferred"`` (the default; also ``?begin=`` in a URL) reads
    through honker's reader pool until the first write opens the write
    transaction; ``"immediate"`` opens it at a transaction's first statement,
    so what it read cannot change before it writes. Other keywords go to
    :func:`sqlalchemy.create_engine`."""
    target, kwargs = _engine_args(database, begin, kwargs)
    return sqlalchemy.create_engine(target, **kwargs)


def create_async_engine(
    database: str | os.PathLike[str] | Store, *, begin: str | None = None, **kwargs: Any
) -> AsyncEngine:
    """:func:`create_engine` for ``AsyncSession``/``AsyncConnection`` (URL
    ``sqlite+honker_async://``)."""
    target, kwargs = _engine_args(database, begin, kwargs)
    target = target.replace("sqlite+honker://", "sqlite+honker_async://", 1)
    return _create_async_engine(target, **kwargs)


def _driver_of(connection: Connection) -> Any:
    dbapi = connection.connection.dbapi_connection
    if not isinstance(dbapi, DriverConnection | AsyncAdaptedConnection):
        raise ConfigError(
            f"{connection.engine.url.render_as_string(hide_password=True)!r} is not a Honker "
            "engine: build it with alkpubsub.storage.sqlalchemy.create_engine"
        )
    return dbapi


def store_transaction(bind: Session | Connection) -> StoreTransaction:
    """The store transaction of ``bind`` (a ``Session`` or a ``Connection`` of a
    Honker engine), opened now if it had not written yet: ``publish``,
    ``notify``, ``enqueue``, locks and schedules through it commit and roll
    back with the session's (or connection's) transaction. Once that ended, its
    methods raise :class:`~alkpubsub.Closed`: take it again in the next one."""
    if isinstance(bind, Session):
        connection = bind.connection()
    else:
        connection = bind
        if not connection.in_transaction():
            connection.begin()  # so that connection.commit() commits what is published
    driver = _driver_of(connection)
    if not isinstance(driver, DriverConnection):
        raise ConfigError("an async engine's session: use async_store_transaction()")
    return driver.begin_write()


class _SessionRunner:
    """Runs an ``AsyncStoreTransaction``'s work on the session connection's home
    thread, while the transaction it was taken in is still the open one."""

    def __init__(self, driver: AsyncAdaptedConnection, tx: StoreTransaction) -> None:
        self._driver = driver
        self._tx = tx
        self.origin = tx.origin

    def run(self, fn: Callable[[StoreTransaction], T]) -> Awaitable[T]:
        session, tx = self._driver.sync.session, self._tx

        def work() -> T:
            if session.tx is not tx:
                raise Closed(
                    "this store transaction ended with its session's commit or rollback; "
                    "await async_store_transaction(session) again in the next one"
                )
            return fn(tx)

        return self._driver.run(work)


async def async_store_transaction(bind: AsyncSession | AsyncConnection) -> AsyncStoreTransaction:
    """:func:`store_transaction` for an ``AsyncSession``/``AsyncConnection``:
    await its methods (``await tx.publish(...)``); they run on the session's
    connection thread, inside its transaction, and raise
    :class:`~alkpubsub.Closed` once that transaction ended."""
    if isinstance(bind, AsyncSession):
        connection = await bind.connection()
    else:
        connection = bind
        if not connection.in_transaction():
            await connection.begin()
    driver = _driver_of(connection.sync_connection)  # type: ignore[arg-type]
    if not isinstance(driver, AsyncAdaptedConnection):
        raise ConfigError("a sync engine's session: use store_transaction()")
    sync = driver.sync
    tx = await driver.run(sync.begin_write)
    return AsyncStoreTransaction(_SessionRunner(driver, tx))


__all__ = [
    "HonkerAsyncDialect",
    "HonkerDialect",
    "async_store_transaction",
    "create_async_engine",
    "create_engine",
    "store_transaction",
    "url",
]
