"""SQLAlchemy dialects for a Honker store: ``sqlite+honker://`` (sync) and
``sqlite+honker_async://`` (``create_async_engine``/``AsyncSession``).

They are SQLAlchemy's own SQLite dialect (SQL compiler, types, reflection,
Alembic's SQLite support: the name stays ``sqlite``) over the driver in
:mod:`alkpubsub.storage.sqla_dbapi`, never over Python's ``sqlite3``.

The async dialect runs each connection's statements on a thread of its own (one
per pooled connection), so the event loop never waits on SQLite and a write
transaction stays on the thread that opened it, as honker requires.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import pool
from sqlalchemy.dialects.sqlite.base import SQLiteDialect, SQLiteExecutionContext
from sqlalchemy.engine import AdaptedConnection, reflection
from sqlalchemy.util import await_only as _await  # 2.0 and 2.1 (there also await_)

from alkpubsub.errors import PubSubError

from . import sqla_dbapi

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import ConnectArgsType, DBAPIConnection, IsolationLevel
    from sqlalchemy.engine.url import URL

T = TypeVar("T")

_LEVELS = ("SERIALIZABLE", "AUTOCOMMIT")
_URL_OPTIONS = {"begin": str, "busy_timeout": float, "origin": str}


def _result_names(context: Any) -> list[str] | None:
    """The compiled statement's result column names, when it has any."""
    compiled = getattr(context, "compiled", None)
    columns = getattr(compiled, "_result_columns", None) if compiled is not None else None
    if not columns or getattr(context, "isddl", False):
        return None
    return [str(entry[0]) for entry in columns]


class HonkerExecutionContext(SQLiteExecutionContext):
    def create_server_side_cursor(self) -> Any:
        # honker returns a statement's rows whole: a "server-side" cursor (for
        # stream_results, yield_per, AsyncConnection.stream) reads them from memory.
        return self._dbapi_connection.cursor()


class HonkerDialect(SQLiteDialect):
    """SQLAlchemy's SQLite dialect over a Honker store (``sqlite+honker:///app.db``)."""

    driver = "honker"
    supports_statement_cache = True
    supports_native_decimal = False
    supports_server_side_cursors = True
    execution_ctx_cls = HonkerExecutionContext

    @classmethod
    def import_dbapi(cls) -> ModuleType:
        return sqla_dbapi

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        return pool.QueuePool

    def create_connect_args(self, url: URL) -> ConnectArgsType:
        unknown = set(url.query) - set(_URL_OPTIONS)
        if unknown:
            raise sqla_dbapi.ProgrammingError(
                f"unknown option(s) {sorted(unknown)} in the URL; known: {sorted(_URL_OPTIONS)}"
            )
        options: dict[str, Any] = {}
        for name, convert in _URL_OPTIONS.items():
            if name in url.query:
                value = url.query[name]
                options[name] = convert(value if isinstance(value, str) else value[-1])
        return [url.database or ""], options

    def _get_server_version_info(self, connection: Any) -> tuple[int, ...]:
        text = connection.exec_driver_sql("SELECT sqlite_version()").scalar()
        return tuple(int(part) for part in str(text).split("."))

    def get_isolation_level_values(self, dbapi_connection: DBAPIConnection) -> list[IsolationLevel]:
        return list(cast("tuple[IsolationLevel, ...]", _LEVELS))

    def set_isolation_level(self, dbapi_connection: DBAPIConnection, level: IsolationLevel) -> None:
        if level not in _LEVELS:
            raise sqla_dbapi.ProgrammingError(
                f"isolation level {level!r}: this dialect has {list(_LEVELS)} (every write "
                "transaction is SERIALIZABLE: SQLite has one writer)"
            )
        _driver(dbapi_connection).autocommit = level == "AUTOCOMMIT"

    def get_isolation_level(self, dbapi_connection: DBAPIConnection) -> IsolationLevel:
        return "AUTOCOMMIT" if _driver(dbapi_connection).autocommit else "SERIALIZABLE"

    def get_default_isolation_level(self, dbapi_conn: DBAPIConnection) -> IsolationLevel:
        return "SERIALIZABLE"

    def on_connect(self) -> None:
        return None  # nothing per connection: the store's connections are honker's

    def do_execute(self, cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        cursor.columns_hint = _result_names(context)
        cursor.execute(statement, parameters)

    def do_execute_no_params(self, cursor: Any, statement: str, context: Any = None) -> None:
        cursor.columns_hint = _result_names(context)
        cursor.execute(statement)

    # honker's own tables (queues, streams, locks, ...) are the store's, not the
    # application's: reflection (and so Alembic's autogenerate) does not list
    # them, as SQLite's dialect hides sqlite_*; sqlite_include_internal=True does.

    @reflection.cache
    def get_table_names(
        self,
        connection: Any,
        schema: str | None = None,
        sqlite_include_internal: bool = False,
        **kw: Any,
    ) -> list[str]:
        names = super().get_table_names(  # type: ignore[no-untyped-call]
            connection, schema, sqlite_include_internal=sqlite_include_internal, **kw
        )
        return names if sqlite_include_internal else [n for n in names if not is_internal(n)]

    @reflection.cache
    def get_view_names(
        self,
        connection: Any,
        schema: str | None = None,
        sqlite_include_internal: bool = False,
        **kw: Any,
    ) -> list[str]:
        names = super().get_view_names(  # type: ignore[no-untyped-call]
            connection, schema, sqlite_include_internal=sqlite_include_internal, **kw
        )
        return names if sqlite_include_internal else [n for n in names if not is_internal(n)]

    def is_disconnect(self, e: Exception, connection: Any, cursor: Any) -> bool:
        return isinstance(e, sqla_dbapi.InterfaceError) and "closed" in str(e)

    def do_terminate(self, dbapi_connection: DBAPIConnection) -> None:
        dbapi_connection.close()


def is_internal(name: str) -> bool:
    """True for a table honker created for its own use (``_honker_*``)."""
    return name.startswith("_honker_")


def _driver(dbapi_connection: Any) -> sqla_dbapi.Connection:
    if isinstance(dbapi_connection, AsyncAdaptedConnection):
        return dbapi_connection.sync
    return cast(sqla_dbapi.Connection, dbapi_connection)


# -- async -------------------------------------------------------------------------


class AsyncAdaptedCursor:
    """The DB-API cursor SQLAlchemy's async engine drives: each statement runs
    on its connection's thread; rows are then read from memory."""

    def __init__(self, connection: AsyncAdaptedConnection) -> None:
        self._connection = connection
        self._cursor = connection.sync.cursor()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("_connection", "_cursor"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._cursor, name, value)

    def execute(self, operation: str, parameters: Any = None) -> Any:
        self._connection.precheck()
        return self._connection.call(lambda: self._cursor.execute(operation, parameters))

    def executemany(self, operation: str, seq_of_parameters: Any) -> Any:
        rows = list(seq_of_parameters)
        self._connection.precheck()
        return self._connection.call(lambda: self._cursor.executemany(operation, rows))

    def __iter__(self) -> Any:
        return iter(self._cursor)

    async def _async_soft_close(self) -> None:
        """What SQLAlchemy's async result calls once it buffered the rows
        (SQLAlchemy >= 2.0.44): they are in memory already; nothing to free."""


class AsyncAdaptedConnection(AdaptedConnection):
    """An async engine's DB-API connection: the sync driver connection, driven
    on its home thread (``sqla_home``), which the loop awaits."""

    __slots__ = ("dbapi", "sync")

    def __init__(self, dbapi: Any, sync: sqla_dbapi.Connection) -> None:
        self.dbapi = dbapi
        self.sync = sync
        self._connection = self  # type: ignore[assignment]  # what driver_connection returns

    def __repr__(self) -> str:
        return f"<AsyncAdaptedConnection {self.sync.store.path!r}>"

    def precheck(self) -> None:
        """On the loop's thread, before a statement that may begin a write: one
        while an async store transaction of this loop is open on the file would
        wait for it forever (the check needs the loop, which the home thread has
        not)."""
        session = self.sync.session
        if session.tx is None:
            shared = self.sync.store.shared
            try:
                shared.sessions.check(shared.path, "a SQLAlchemy write transaction")
            except PubSubError as exc:
                raise sqla_dbapi.OperationalError(str(exc)) from exc

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the home thread, awaited from SQLAlchemy's greenlet."""
        loop = asyncio.get_running_loop()
        return _await(loop.run_in_executor(self.sync.session.executor(), fn))

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the home thread, awaited from a coroutine."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.sync.session.executor(), fn)

    def cursor(self, server_side: bool = False) -> AsyncAdaptedCursor:
        return AsyncAdaptedCursor(self)

    def commit(self) -> None:
        self.call(self.sync.commit)

    def rollback(self) -> None:
        self.call(self.sync.rollback)

    def close(self) -> None:
        self.call(self.sync.close)

    def terminate(self) -> None:
        # Outside a greenlet (garbage collection, a dead loop): close on the home
        # thread without waiting for it.
        self.sync.session.executor().submit(self.sync.close)


class AsyncDBAPI:
    """The module-like DB-API object the async dialect hands SQLAlchemy."""

    paramstyle = sqla_dbapi.paramstyle
    apilevel = sqla_dbapi.apilevel
    threadsafety = sqla_dbapi.threadsafety
    Binary = sqla_dbapi.Binary
    Warning = sqla_dbapi.Warning
    Error = sqla_dbapi.Error
    InterfaceError = sqla_dbapi.InterfaceError
    DatabaseError = sqla_dbapi.DatabaseError
    DataError = sqla_dbapi.DataError
    OperationalError = sqla_dbapi.OperationalError
    IntegrityError = sqla_dbapi.IntegrityError
    InternalError = sqla_dbapi.InternalError
    ProgrammingError = sqla_dbapi.ProgrammingError
    NotSupportedError = sqla_dbapi.NotSupportedError

    @property
    def sqlite_version_info(self) -> tuple[int, ...]:
        return cast("tuple[int, ...]", sqla_dbapi.sqlite_version_info)

    def connect(self, *args: Any, **kwargs: Any) -> AsyncAdaptedConnection:
        loop = asyncio.get_running_loop()
        sync = _await(loop.run_in_executor(None, lambda: sqla_dbapi.connect(*args, **kwargs)))
        return AsyncAdaptedConnection(self, sync)


class HonkerAsyncDialect(HonkerDialect):
    """The async form (``sqlite+honker_async:///app.db``, ``create_async_engine``)."""

    driver = "honker_async"
    is_async = True
    supports_statement_cache = True
    has_terminate = True

    @classmethod
    def import_dbapi(cls) -> ModuleType:
        return cast(ModuleType, AsyncDBAPI())

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        return pool.AsyncAdaptedQueuePool

    def get_driver_connection(self, connection: Any) -> Any:
        return connection

    def do_terminate(self, dbapi_connection: DBAPIConnection) -> None:
        cast(AsyncAdaptedConnection, dbapi_connection).terminate()
