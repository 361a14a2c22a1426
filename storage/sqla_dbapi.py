"""A PEP 249 (DB-API 2.0) driver over a Honker store, for SQLAlchemy.

SQLAlchemy needs a DB-API module; Python's ``sqlite3`` must not open a file
honker has open in the same process (two SQLite libraries break each other's
locks), so this driver reaches the file only through the store:

- a statement that only reads (``SELECT``, ``VALUES``, ``EXPLAIN``, a reading
  ``PRAGMA``) outside a write transaction runs on honker's reader pool, and
  sees what was committed when it ran;
- any other statement (DML, DDL, ``SAVEPOINT``, ``WITH ...``) opens the
  connection's write transaction, ``store.transaction()``: the store's write
  gate, then honker's ``BEGIN IMMEDIATE`` on its writer connection. Every later
  statement, reads included, runs in it until ``commit()`` or ``rollback()``;
  ``tx.publish``/``tx.notify``/``tx.enqueue`` through :meth:`Connection.begin_write`
  commit with it. ``begin="immediate"`` opens it at the first statement of any
  kind (a read-modify-write then reads under the write lock).

honker returns rows as dicts keyed by column name, and nothing for a statement
without rows, so the driver recovers what a DB-API cursor reports: column names
from the first row, or from the caller's hint (the dialect passes the compiled
statement's result columns), or, for a ``SELECT`` without rows, from a one-row
probe (``SELECT q.* FROM (SELECT 1) LEFT JOIN (<statement>) q``);
``rowcount``/``lastrowid`` from SQLite's ``changes()``/``last_insert_rowid()``.
Two result columns with the same name cannot be told apart: label them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import honker

from alkpubsub.errors import (
    Closed,
    ConfigError,
    ConnectionLost,
    ConstraintViolation,
    DatabaseBusy,
    PubSubError,
    SQLError,
    StorageError,
    TransactionOpen,
)

from .sqla_home import WriteSession
from .sqlerrors import run_sql
from .store import Store, open_store
from .transaction import StoreTransaction

T = TypeVar("T")

apilevel = "2.0"
threadsafety = 1  # threads may share the module, not connections
paramstyle = "qmark"

Binary = bytes


# -- the DB-API exception hierarchy ------------------------------------------


class Warning(Exception):
    """PEP 249 ``Warning`` (never raised)."""


class Error(Exception):
    """Base of this driver's errors. ``__cause__`` is alkpubsub's own error
    (e.g. :class:`~alkpubsub.ConstraintViolation` with ``table``/``columns``)."""


class InterfaceError(Error):
    """The driver was misused (a closed connection or cursor)."""


class DatabaseError(Error):
    """The database refused the statement."""


class DataError(DatabaseError):
    """A value could not be bound."""


class OperationalError(DatabaseError):
    """A syntax error, an unknown table or column, a busy file, a lost store."""


class IntegrityError(DatabaseError):
    """A constraint failed (UNIQUE, NOT NULL, CHECK, PRIMARY KEY, FOREIGN KEY)."""


class InternalError(DatabaseError):
    """The store is in a state it cannot go on from."""


class ProgrammingError(DatabaseError):
    """The call itself is wrong (bad parameters, transaction control in SQL)."""


class NotSupportedError(DatabaseError):
    """Something SQLite could do but this driver cannot report (see the module docstring)."""


_KINDS: tuple[tuple[type[BaseException], type[Error]], ...] = (
    (ConstraintViolation, IntegrityError),
    (DatabaseBusy, OperationalError),
    (SQLError, OperationalError),
    (TransactionOpen, OperationalError),
    (Closed, InterfaceError),
    (ConnectionLost, OperationalError),
    (ConfigError, ProgrammingError),
    (StorageError, DatabaseError),
    (PubSubError, DatabaseError),
)


_PASS_THROUGH = (Error, KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError)
"""Raised as they are: this driver's own errors, interrupts, cancellations."""


def dbapi_error(exc: BaseException) -> Error:
    """The DB-API error for alkpubsub's ``exc`` (or honker's bare errors)."""
    for kind, error in _KINDS:
        if isinstance(exc, kind):
            return error(str(exc))
    if isinstance(exc, TypeError | OverflowError | ValueError):
        return DataError(f"a parameter could not be bound: {exc}")
    return DatabaseError(str(exc))


# -- the SQLite version honker bundles ------------------------------------------

_version_lock = threading.Lock()
_version: tuple[int, ...] | None = None


def _bundled_sqlite_version() -> tuple[int, ...]:
    """Ask honker's own SQLite (not Python's) once, on a scratch file."""
    global _version
    with _version_lock:
        if _version is None:
            with tempfile.TemporaryDirectory(prefix="alkpubsub-version-") as folder:
                db = honker.open(os.path.join(folder, "v.db"))
                try:
                    text = db.query("SELECT sqlite_version() AS v")[0]["v"]
                finally:
                    db.close()
            _version = tuple(int(part) for part in str(text).split("."))
        return _version


def __getattr__(name: str) -> Any:
    # sqlite_version_info is read when SQLAlchemy loads the dialect; computing
    # it on import would open a file for everyone who imports the module.
    if name == "sqlite_version_info":
        return _bundled_sqlite_version()
    if name == "sqlite_version":
        return ".".join(map(str, _bundled_sqlite_version()))
    raise AttributeError(name)


# -- statements ----------------------------------------------------------------

_COMMENTS = re.compile(r"\s*(?:--[^\n]*(?:\n|$)|/\*.*?\*/)", re.S)
_FIRST_WORD = re.compile(r"\s*([A-Za-z]+)")
_READING_PRAGMAS = frozenset(
    {
        "table_info",
        "table_xinfo",
        "table_list",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
        "database_list",
        "collation_list",
        "compile_options",
        "function_list",
        "read_uncommitted",
        "data_version",
        "user_version",
        "schema_version",
        "page_count",
        "page_size",
        "freelist_count",
        "encoding",
        "journal_mode",
        "foreign_keys",
    }
)
_SETTABLE = frozenset(
    {"journal_mode", "foreign_keys", "user_version", "schema_version", "page_size"}
)
"""Reading pragmas whose argument form sets them: ``PRAGMA journal_mode(WAL)``."""
_TRANSACTION_CONTROL = frozenset({"BEGIN", "COMMIT", "END", "ROLLBACK"})
_TO_SAVEPOINT = re.compile(r"\s*ROLLBACK\s+(?:TRANSACTION\s+)?TO\b", re.I)
_ROWS_FIRST = frozenset({"SELECT", "VALUES", "WITH"})
_DML = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE"})
_HONKER_CALL = re.compile(r"\bhonker_\w*\s*\(", re.I)
_TRAILING = re.compile(r"[\s;]+$")
"""Semicolons and blanks after a statement (left out of the probe, which also
puts a newline before its closing parenthesis for a trailing line comment)."""
_CHANGES = "SELECT changes() AS n, last_insert_rowid() AS r"
_TOTAL_CHANGES = "SELECT total_changes() AS n"

READ, WRITE = "read", "write"


def first_word(sql: str) -> str:
    """The statement's first keyword, upper-cased, after leading comments."""
    rest = sql
    while True:
        found = _COMMENTS.match(rest)
        if found is None:
            break
        rest = rest[found.end() :]
    word = _FIRST_WORD.match(rest)
    return word.group(1).upper() if word else ""


def kind_of(sql: str, word: str) -> str:
    """READ if the statement surely only reads, else WRITE (``WITH`` may hold DML)."""
    if word in ("SELECT", "VALUES", "EXPLAIN"):
        # honker's SQL functions (honker_enqueue, honker_lock_acquire, ...) write,
        # and exist only on the writer connection.
        return WRITE if _HONKER_CALL.search(sql) else READ
    if word == "PRAGMA" and pragma_as_select(sql) is not None:
        return READ
    return WRITE


_IDENT = r'"(?:[^"]|"")*"|`(?:[^`]|``)*`|\[[^\]]*\]|[\w$]+'
_PRAGMA_READ = re.compile(
    rf"\s*PRAGMA\s+(?:(?P<schema>{_IDENT})\s*\.\s*)?(?P<name>\w+)\s*"
    rf"(?:\(\s*(?P<arg>'(?:[^']|'')*'|{_IDENT})\s*\))?\s*;?\s*$",
    re.I,
)


_CONNECTION_PRAGMAS = frozenset(
    {
        "automatic_index",
        "busy_timeout",
        "cache_size",
        "cache_spill",
        "cell_size_check",
        "foreign_keys",
        "journal_mode",
        "journal_size_limit",
        "locking_mode",
        "mmap_size",
        "query_only",
        "recursive_triggers",
        "secure_delete",
        "synchronous",
        "temp_store",
        "trusted_schema",
        "wal_autocheckpoint",
    }
)
"""Settings of a SQLite connection, not data: see Connection._check_setting."""
_PRAGMA_SET = re.compile(
    r"\s*PRAGMA\s+(?:[\w$]+\s*\.\s*)?(?P<name>\w+)\s*"
    r"(?:=\s*(?P<eq>[^;]+?)|\(\s*(?P<paren>[^)]+?)\s*\))\s*;?\s*$",
    re.I,
)
_NAMED_VALUES = {
    "on": 1,
    "true": 1,
    "yes": 1,
    "off": 0,
    "false": 0,
    "no": 0,
    "normal": 1,
    "full": 2,
    "extra": 3,
    "default": 0,
    "file": 1,
    "memory": 2,
}


def connection_setting(sql: str) -> tuple[str, str] | None:
    """``(name, value)`` of a PRAGMA that sets a connection setting, or None."""
    found = _PRAGMA_SET.match(_strip_comments(sql))
    if found is None or found.group("name").lower() not in _CONNECTION_PRAGMAS:
        return None
    value = found.group("eq") if found.group("eq") is not None else found.group("paren")
    return found.group("name").lower(), _unquote(value.strip())


def _setting_value(name: str, value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip().lower()
        if name == "journal_mode":
            return text
        if text.lstrip("-").isdigit():
            return int(text)
        return _NAMED_VALUES.get(text, text)
    return value


def _unquote(token: str) -> str:
    if token[:1] == "'" and token[-1:] == "'":
        return token[1:-1].replace("''", "'")
    if token[:1] in ('"', "`") and token[-1:] == token[:1]:
        quote = token[:1]
        return token[1:-1].replace(quote * 2, quote)
    if token[:1] == "[" and token[-1:] == "]":
        return token[1:-1]
    return token


def pragma_as_select(sql: str) -> tuple[str, list[Any]] | None:
    """A reading PRAGMA as ``SELECT * FROM pragma_<name>(...)``, or None if the
    PRAGMA is not one that only reads.

    honker caches prepared statements, and a PRAGMA such as
    ``foreign_key_list`` computes its rows when prepared: on a reader that had
    not seen a table's CREATE yet it returns nothing, then and on every later
    call (seen here: 0 rows five times after the commit). The table-valued form
    is evaluated when it runs, after SQLite checked the schema."""
    found = _PRAGMA_READ.match(_strip_comments(sql))
    if found is None:
        return None
    name = found.group("name").lower()
    arg, schema = found.group("arg"), found.group("schema")
    if name not in _READING_PRAGMAS or (arg is not None and name in _SETTABLE):
        return None
    args = [] if arg is None else [_unquote(arg)]
    if schema is not None:
        if arg is None:
            return None  # pragma_<flag>() takes no schema argument
        args.append(_unquote(schema))
    holes = ", ".join("?" * len(args))
    return f"SELECT * FROM pragma_{name}({holes})", args


def _top_level(sql: str) -> list[tuple[int, str]]:
    """The statement's characters outside quotes, comments and parentheses, as
    (position, character) pairs."""
    out: list[tuple[int, str]] = []
    depth, i, n = 0, 0, len(sql)
    closers = {"'": "'", '"': '"', "`": "`", "[": "]"}
    while i < n:
        c = sql[i]
        if c in closers:
            end = sql.find(closers[c], i + 1)
            while c != "[" and end != -1 and sql[end + 1 : end + 2] == c:
                end = sql.find(c, end + 2)  # a doubled quote inside the quotes
            i = n if end == -1 else end + 1
            continue
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end == -1 else end + 1
            continue
        if sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end == -1 else end + 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0:
            out.append((i, c))
        i += 1
    return out


_COMMENT_ANYWHERE = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_AS_ALIAS = re.compile(r"(?is).*\bAS\s+(\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]|\w+)\s*$")
_QUALIFIED = re.compile(r"^(?:[\w$]+\s*\.\s*)*(\"(?:[^\"]|\"\")*\"|[\w$]+)$")


def returning_names(
    sql: str, columns_of: Callable[[str], list[str]] | None = None
) -> list[str] | None:
    """The names of a DML statement's ``RETURNING`` columns, read from its text
    (for a RETURNING that matched no row, where honker gives no names): an
    alias (with or without ``AS``), a column's own name, else the expression's
    text, as SQLite names them. ``*`` takes the target table's columns from
    ``columns_of(table)``. None if there is no RETURNING, or no way to know."""
    chars = _top_level(sql)
    flat = "".join(c for _, c in chars)
    found = list(re.finditer(r"\bRETURNING\b", flat, re.I))
    if not found:
        return None
    start = chars[found[-1].end() - 1][0] + 1
    clause = _TRAILING.sub("", sql[start:])
    positions = [p for p, c in _top_level(clause) if c == ","]
    items, last = [], 0
    for p in [*positions, len(clause)]:
        items.append(_COMMENT_ANYWHERE.sub("", clause[last:p]).strip())
        last = p + 1
    names: list[str] = []
    for item in items:
        if item == "*" or item.endswith(".*"):
            target = _DML_TARGET.search(flat)
            if target is None or columns_of is None:
                return None
            names.extend(columns_of(_unquote(target.group(1))))
            continue
        names.append(_item_name(item))
    return names


_DML_TARGET = re.compile(
    r"\b(?:UPDATE(?:\s+OR\s+\w+)?|DELETE\s+FROM|INTO)\s+(?:[\w$]+\s*\.\s*)?"
    r"(\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]|[\w$]+)",
    re.I,
)
_BARE_ALIAS = re.compile(
    r"(?s)^(?P<expr>.*[\w)\]\"'`])\s+(?P<alias>\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]|[A-Za-z_]\w*)$"
)
_NOT_ALIASES = frozenset(
    {"end", "null", "true", "false", "asc", "desc", "and", "or", "not", "is", "then", "else"}
)


def _item_name(item: str) -> str:
    alias = _AS_ALIAS.match(item)
    if alias:
        return _unquote(alias.group(1))
    inner = item
    while inner.startswith("(") and inner.endswith(")") and _balanced(inner[1:-1]):
        inner = inner[1:-1].strip()
    plain = _QUALIFIED.match(inner)
    if plain:
        return _unquote(plain.group(1))
    bare = _BARE_ALIAS.match(item)
    if bare and bare.group("alias").lower() not in _NOT_ALIASES:
        return _unquote(bare.group("alias"))
    return item


def _balanced(text: str) -> bool:
    depth = 0
    for c in text:
        depth += (c == "(") - (c == ")")
        if depth < 0:
            return False
    return depth == 0


def _strip_comments(sql: str) -> str:
    rest = sql
    while True:
        found = _COMMENTS.match(rest)
        if found is None:
            return rest
        rest = rest[found.end() :]


def _params(parameters: Any) -> list[Any]:
    if parameters is None:
        return []
    if isinstance(parameters, dict):
        raise ProgrammingError(
            "this driver's paramstyle is 'qmark': pass parameters as a sequence for '?' "
            "placeholders, not a dict"
        )
    if isinstance(parameters, str | bytes) or not isinstance(parameters, Sequence):
        raise ProgrammingError(
            f"parameters must be a sequence (tuple or list), not {type(parameters).__name__}"
        )
    return [_value(p, i) for i, p in enumerate(parameters)]


_INT64 = (-(2**63), 2**63 - 1)


def _value(value: Any, index: int) -> Any:
    """A parameter as honker binds it exactly, or DataError (honker would turn an
    int beyond 64 bits into a float, and a Decimal into a float, silently)."""
    if value is None or isinstance(value, str | float | bytes):
        return value
    if isinstance(value, int):
        if not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
            raise DataError(
                f"parameter {index + 1}: {value} does not fit SQLite's 64-bit INTEGER; store it "
                "as text (or use SQLAlchemy's Numeric/String types)"
            )
        return value
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    raise DataError(
        f"parameter {index + 1}: a {type(value).__name__} cannot be bound: pass None, int, "
        "float, str or bytes (SQLAlchemy's column types convert dates, decimals and JSON)"
    )


Description = tuple[tuple[str, None, None, None, None, None, None], ...]


# -- connection and cursor -------------------------------------------------------


class Connection:
    """One DB-API connection: a handle on the store, and at most one open write
    transaction of it (see the module docstring)."""

    def __init__(self, store: Store, *, begin: str = "deferred", owns_store: bool = True) -> None:
        if begin not in ("deferred", "immediate"):
            raise ConfigError(f"begin={begin!r}: use 'deferred' or 'immediate'")
        self.store = store
        self.begin = begin
        self.autocommit = False
        self.session = WriteSession(store)
        _start_janitor()
        self._owns_store = owns_store
        self._closed = False

    # -- transaction -----------------------------------------------------------

    @property
    def in_write_transaction(self) -> bool:
        """True while this connection holds the store's write transaction."""
        return self.session.tx is not None

    def begin_write(self) -> StoreTransaction:
        """The open write transaction, opened now if there is none: rows,
        ``tx.publish``/``tx.notify`` events and ``tx.enqueue`` jobs made through
        it commit or roll back with this connection (from any thread)."""
        self._check_open()
        try:
            return self.session.begin()
        except _PASS_THROUGH:
            raise
        except BaseException as exc:
            raise dbapi_error(exc) from exc

    def commit(self) -> None:
        """Commit the write transaction (rows and events together); nothing if none."""
        self._check_open()
        try:
            self.session.end(commit=True)
        except _PASS_THROUGH:
            raise
        except BaseException as exc:
            raise dbapi_error(exc) from exc

    def rollback(self) -> None:
        """Roll the write transaction back: none of its rows or events exist."""
        if self._closed:
            return
        try:
            self.session.end(commit=False)
        except _PASS_THROUGH:
            raise
        except BaseException as exc:
            raise dbapi_error(exc) from exc

    def close(self) -> None:
        """Roll back what is open and release the store handle. Idempotent."""
        if self._closed:
            return
        try:
            self.session.close()
        finally:
            self._closed = True
            if self._owns_store:
                self.store.close()

    def __del__(self) -> None:
        # A connection dropped without close() (an engine garbage-collected
        # without dispose()) still rolls back and releases its store handle,
        # but not here: the collector may run inside a lock that closing takes
        # (concurrent.futures' own, for one), so the janitor thread does it.
        if not getattr(self, "_closed", True):
            _janitor.put(self)

    def cursor(self) -> Cursor:
        self._check_open()
        return Cursor(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise InterfaceError("this connection is closed")

    # -- running statements ----------------------------------------------------

    def run(
        self, sql: str, parameters: Any, hint: Sequence[str] | None
    ) -> tuple[Description | None, list[tuple[Any, ...]], int, int | None]:
        """Run one statement: (description, rows, rowcount, lastrowid)."""
        self._check_open()
        args = _params(parameters)
        word = first_word(sql)
        if word in _TRANSACTION_CONTROL and not _TO_SAVEPOINT.match(_strip_comments(sql)):
            raise ProgrammingError(
                f"{word} in SQL: end transactions with the connection's commit()/rollback() "
                "(SQLAlchemy: session.commit(), connection.commit()); SAVEPOINT is fine"
            )
        if word == "PRAGMA":
            setting = connection_setting(sql)
            if setting is not None:
                self._check_setting(*setting)
                return None, [], -1, None
        kind = kind_of(sql, word)
        if word == "PRAGMA" and kind == READ:
            rewritten = pragma_as_select(sql)
            assert rewritten is not None
            sql, args = rewritten
            word = "SELECT"
        if self.session.tx is None and kind == READ and self.begin == "deferred":
            db = self.store.shared.db
            rows = self._call(lambda: db.query(sql, args), sql)
            return self._result(sql, args, rows, hint, db.query, word), _tuples(rows), -1, None
        if self.autocommit and self.session.tx is None:
            try:
                result = self._in_tx(sql, args, hint, word, kind)
            except BaseException:
                self.rollback()
                raise
            self.commit()
            return result
        return self._in_tx(sql, args, hint, word, kind)

    def _columns_of(self, table: str) -> list[str]:
        """The columns of ``table`` in this connection's view (its write
        transaction's, where one is open)."""
        tx = self.session.tx
        query = tx.honker.query if tx is not None else self.store.shared.db.query
        return [str(row["name"]) for row in query("SELECT name FROM pragma_table_info(?)", [table])]

    def _check_setting(self, name: str, value: str) -> None:
        """A connection setting (``PRAGMA foreign_keys=ON`` in a "connect" event
        listener): honker's connections are shared and already set, so asking
        for their value is a no-op, and asking for another is refused."""
        rows = self._call(
            lambda: self.store.shared.db.query(f"SELECT * FROM pragma_{name}()", []), name
        )
        current = _setting_value(name, next(iter(rows[0].values())) if rows else None)
        if current != _setting_value(name, value):
            raise NotSupportedError(
                f"PRAGMA {name} = {value}: the Honker store's connections are shared by the whole "
                f"process and set by honker ({name} is {current!r} here); this driver cannot "
                "change them per connection"
            )

    def _in_tx(
        self, sql: str, args: list[Any], hint: Sequence[str] | None, word: str, kind: str
    ) -> tuple[Description | None, list[tuple[Any, ...]], int, int | None]:
        self._check_open()

        def work(tx: StoreTransaction) -> tuple[list[dict[str, Any]], int, int | None]:
            query = tx.honker.query
            before = query(_TOTAL_CHANGES, [])[0]["n"] if word == "WITH" else 0
            rows: list[dict[str, Any]] = run_sql(lambda: query(sql, args), sql)
            if word in _DML:
                info = query(_CHANGES, [])[0]
                lastrowid = int(info["r"]) if word in ("INSERT", "REPLACE") else None
                return rows, int(info["n"]), lastrowid
            if word == "WITH":
                return rows, int(query(_TOTAL_CHANGES, [])[0]["n"]) - int(before), None
            return rows, -1, None

        rows, rowcount, lastrowid = self._call(lambda: self.session.within(work), sql)
        tx = self.session.tx
        assert tx is not None
        query = tx.honker.query
        if kind == READ or word == "WITH":
            description = self._result(sql, args, rows, hint, query, word)
        else:
            if hint is None and not rows and "returning" in sql.lower():
                hint = returning_names(sql, self._columns_of)
            description = _describe(rows, hint)
        if word == "WITH" and rowcount == 0 and description is not None:
            rowcount = -1  # a WITH ... SELECT
        return description, _tuples(rows), rowcount, lastrowid

    def _result(
        self,
        sql: str,
        args: list[Any],
        rows: list[dict[str, Any]],
        hint: Sequence[str] | None,
        query: Any,
        word: str,
    ) -> Description | None:
        if hint is not None and "*" in hint:
            hint = None  # select(literal_column("*")): the names are the table's
        description = _describe(rows, hint)
        if description is None and word in _ROWS_FIRST:
            body = _TRAILING.sub("", sql)
            probe = f"SELECT q.* FROM (SELECT 1) LEFT JOIN ({body}\n) AS q ON 1 LIMIT 1"
            try:
                shape = query(probe, args)
            except RuntimeError:
                # Not a query (WITH ... UPDATE ... RETURNING) or not wrappable.
                names = (
                    returning_names(sql, self._columns_of) if "returning" in sql.lower() else None
                )
                return _describe([], names)
            description = _describe(shape, None)
        return description

    @staticmethod
    def _call(fn: Callable[[], T], sql: str) -> T:
        try:
            return run_sql(fn, sql)
        except _PASS_THROUGH:
            raise
        except BaseException as exc:
            raise dbapi_error(exc) from exc


_janitor: queue.SimpleQueue[Connection] = queue.SimpleQueue()
_janitor_started = threading.Lock()
_janitor_thread: threading.Thread | None = None


def _start_janitor() -> None:
    global _janitor_thread
    if _janitor_thread is not None:
        return
    with _janitor_started:
        if _janitor_thread is None:
            _janitor_thread = threading.Thread(target=_sweep, name="alkpubsub-janitor", daemon=True)
            _janitor_thread.start()


def _sweep() -> None:
    """Close connections the garbage collector found unclosed (see __del__)."""
    while True:
        connection = _janitor.get()
        with contextlib.suppress(Exception):
            connection.close()
        del connection


def _describe(rows: list[dict[str, Any]], hint: Sequence[str] | None) -> Description | None:
    if rows:
        names: Sequence[str] = list(rows[0])
        if hint is not None and len(hint) > len(names):
            raise NotSupportedError(
                f"the statement returns {len(hint)} columns but only {len(names)} distinct "
                "names: give each result column its own label (honker returns rows by name)"
            )
    elif hint:
        names = hint
    else:
        return None
    return tuple((name, None, None, None, None, None, None) for name in names)


def _tuples(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [tuple(row.values()) for row in rows]


class Cursor:
    """A DB-API cursor; results are read whole (honker returns them whole)."""

    arraysize = 1

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.description: Description | None = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self.columns_hint: Sequence[str] | None = None
        self._rows: deque[tuple[Any, ...]] = deque()
        self._closed = False

    def execute(self, operation: str, parameters: Any = None) -> Cursor:
        self._check_open()
        hint, self.columns_hint = self.columns_hint, None
        self.description, rows, self.rowcount, lastrowid = self.connection.run(
            operation, parameters, hint
        )
        if lastrowid is not None:
            self.lastrowid = lastrowid
        self._rows = deque(rows)
        return self

    def executemany(self, operation: str, seq_of_parameters: Any) -> Cursor:
        self._check_open()
        total = 0
        connection = self.connection
        word = first_word(operation)
        if kind_of(operation, word) == READ:
            raise ProgrammingError("executemany() is for statements that write")
        for parameters in seq_of_parameters:
            _, _, count, lastrowid = connection.run(operation, parameters, None)
            total += max(count, 0)
            if lastrowid is not None:
                self.lastrowid = lastrowid
        self.description, self.rowcount, self._rows = None, total, deque()
        return self

    def fetchone(self) -> tuple[Any, ...] | None:
        self._check_open()
        return self._rows.popleft() if self._rows else None

    def fetchmany(self, size: int | None = None) -> list[tuple[Any, ...]]:
        self._check_open()
        count = self.arraysize if size is None else size
        rows = self._rows
        return [rows.popleft() for _ in range(min(count, len(rows)))]

    def fetchall(self) -> list[tuple[Any, ...]]:
        self._check_open()
        rows = list(self._rows)
        self._rows.clear()
        return rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        while self._rows:
            yield self._rows.popleft()

    def close(self) -> None:
        self._closed = True
        self._rows.clear()

    def setinputsizes(self, sizes: Any) -> None:
        pass

    def setoutputsize(self, size: Any, column: Any = None) -> None:
        pass

    def _check_open(self) -> None:
        if self._closed:
            raise InterfaceError("this cursor is closed")
        self.connection._check_open()


def connect(
    database: str | os.PathLike[str] | Store,
    *,
    begin: str = "deferred",
    busy_timeout: float | None = None,
    origin: str | None = None,
) -> Connection:
    """A connection on the Honker file ``database`` (opened with
    :func:`~alkpubsub.storage.open_store`, shared per process), or on an open
    :class:`~alkpubsub.storage.Store` (which the connection does not close)."""
    if isinstance(database, Store):
        return Connection(database, begin=begin, owns_store=False)
    if not database or str(database) == ":memory:":
        raise ProgrammingError(
            "honker needs a database file (its readers would not see a :memory: database); "
            "name a file"
        )
    kwargs: dict[str, Any] = {"origin": origin}
    if busy_timeout is not None:
        kwargs["busy_timeout"] = float(busy_timeout)
    try:
        store = open_store(database, **kwargs)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise dbapi_error(exc) from exc
    try:
        return Connection(store, begin=begin)
    except BaseException:
        store.close()
        raise
