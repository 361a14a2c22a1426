"""SQLAlchemy ORM unit-of-work throughput through the Honker dialect, in one run
next to the same ORM code on SQLAlchemy's own pysqlite driver (another file,
WAL and synchronous=NORMAL like honker's) and the store's raw SQL path.

Each row: N sessions, each adding one row (and, where it says so, publishing
one event through ``store_transaction``) and committing.

    .venv/bin/python scripts/orm_throughput.py [--count 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from typing import Any

import sqlalchemy
from sqlalchemy import String, event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from alkpubsub.storage import open_store
from alkpubsub.storage.sqlalchemy import (
    async_store_transaction,
    create_async_engine,
    create_engine,
    store_transaction,
)


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    ref: Mapped[str] = mapped_column(String(20))


def orm(engine: sqlalchemy.Engine, count: int, publish: bool) -> float:
    Base.metadata.create_all(engine)
    started = time.perf_counter()
    for i in range(count):
        with Session(engine) as session:
            session.add(Order(ref=f"r{i}"))
            if publish:
                store_transaction(session).publish("orders:created", {"i": i})
            session.commit()
    engine.dispose()
    return count / (time.perf_counter() - started)


def pysqlite_wal(path: str) -> sqlalchemy.Engine:
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    return engine


def raw(path: str, count: int) -> float:
    store = open_store(path)
    with store.transaction() as tx:
        tx.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, ref TEXT)")
    started = time.perf_counter()
    for i in range(count):
        with store.transaction() as tx:
            tx.execute("INSERT INTO orders (ref) VALUES (?)", [f"r{i}"])
            tx.publish("orders:created", {"i": i})
    rate = count / (time.perf_counter() - started)
    store.close()
    return rate


async def orm_async(path: str, count: int) -> float:
    engine = create_async_engine(path)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    started = time.perf_counter()
    for i in range(count):
        async with AsyncSession(engine) as session:
            session.add(Order(ref=f"r{i}"))
            tx = await async_store_transaction(session)
            await tx.publish("orders:created", {"i": i})
            await session.commit()
    rate = count / (time.perf_counter() - started)
    await engine.dispose()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    count = parser.parse_args().count
    folder = tempfile.mkdtemp(prefix="alkpubsub-orm-")
    rows = {
        "pysqlite ORM (WAL, synchronous=NORMAL)": orm(
            pysqlite_wal(f"{folder}/py.db"), count, False
        ),
        "sqlite+honker ORM": orm(create_engine(f"{folder}/h.db"), count, False),
        "sqlite+honker ORM + publish": orm(create_engine(f"{folder}/hp.db"), count, True),
        "sqlite+honker_async AsyncSession + publish": asyncio.run(
            orm_async(f"{folder}/a.db", count)
        ),
        "store.transaction() raw SQL + publish": raw(f"{folder}/raw.db", count),
    }
    base = rows["pysqlite ORM (WAL, synchronous=NORMAL)"]
    for name, rate in rows.items():
        print(f"{name:45s} {rate:8.0f} commits/s  {rate / base:5.2f}x pysqlite")


if __name__ == "__main__":
    main()
