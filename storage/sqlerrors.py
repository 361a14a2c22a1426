"""SQLite's errors, as honker reports them, turned into :class:`StorageError` subclasses.

honker raises a bare ``RuntimeError`` carrying SQLite's message (for example
``UNIQUE constraint failed: orders.ref``). :func:`translate` reads that message
(the only form SQLite gives it in) and names the statement's table, columns or
constraint where SQLite does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from alkpubsub.errors import ConstraintViolation, DatabaseBusy, SQLError, StorageError

T = TypeVar("T")

_CONSTRAINT = re.compile(
    r"^(UNIQUE|NOT NULL|CHECK|FOREIGN KEY|PRIMARY KEY) constraint failed(?:: (.*))?$"
)
_SQL_MISTAKES = (
    "syntax error",
    "no such table",
    "no such column",
    "has no column named",
    "incomplete input",
    "unrecognized token",
    'near "',
)
_BUSY = ("database is locked", "database table is locked", "database is busy")
_SHOWN = 200
"""Characters of a statement quoted in a message."""


def run_sql(call: Callable[[], T], sql: str) -> T:
    """``call()``, with SQLite's errors raised as :class:`StorageError` subclasses."""
    try:
        return call()
    except RuntimeError as exc:
        raise translate(str(exc), sql) from None


def translate(message: str, sql: str) -> StorageError:
    """The typed error for SQLite's ``message`` about statement ``sql``."""
    shown = " ".join(sql.split())
    shown = shown if len(shown) <= _SHOWN else shown[:_SHOWN] + "..."
    rollback = (
        "the transaction rolls back as this leaves its block: no row or event of it is committed"
    )
    found = _CONSTRAINT.match(message.strip())
    if found:
        kind, where = found.group(1), found.group(2) or ""
        table, columns = _where(kind, where)
        named = f" on {table}({', '.join(columns)})" if table else f" ({where})" if where else ""
        return ConstraintViolation(
            f"{kind} constraint failed{named} in {shown!r}; {rollback}. Change the values, "
            "or catch ConstraintViolation to handle it (e.g. an INSERT ... ON CONFLICT)",
            kind=kind,
            table=table,
            columns=columns,
            statement=sql,
            sqlite_message=message,
        )
    lowered = message.lower()
    if any(word in lowered for word in _SQL_MISTAKES):
        return SQLError(
            f"SQL error in {shown!r}: {message}; {rollback}. Fix the statement (or run the "
            "migration that creates the table or column)",
            statement=sql,
            sqlite_message=message,
        )
    if lowered.startswith(_BUSY):
        return DatabaseBusy(
            f"{message} while running {shown!r}: another connection held the file's write "
            f"lock past the write timeout; {rollback}. Retry, or find the long transaction",
            statement=sql,
            sqlite_message=message,
        )
    return StorageError(
        f"SQLite failed on {shown!r}: {message}; {rollback}",
        statement=sql,
        sqlite_message=message,
    )


def _where(kind: str, where: str) -> tuple[str | None, tuple[str, ...]]:
    """``orders.ref, orders.shop`` -> ("orders", ("ref", "shop")); a CHECK names its
    expression (or constraint name), not columns."""
    if kind == "CHECK" or not where:
        return None, ()
    parts = [p.strip() for p in where.split(",")]
    # "table.column": a table name may hold dots itself, a column name seldom does.
    tables = {p.rpartition(".")[0] for p in parts if "." in p}
    if len(tables) != 1:
        return None, ()
    return tables.pop(), tuple(p.rpartition(".")[2] for p in parts)
