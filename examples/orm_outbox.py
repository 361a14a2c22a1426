"""SQLAlchemy ORM rows, their events and their jobs in one commit (Honker).

A ``Session`` on the ``sqlite+honker://`` dialect adds an ``Order`` and, in the
same SQLite transaction, publishes ``orders:created`` and enqueues a
``send-receipt`` job through ``store_transaction(session)``. A durable
consumer in another OS process sees the event only once the session commits;
a session that rolls back leaves no row, no event and no job. The same with
``AsyncSession`` closes the example.

Run: python examples/orm_outbox.py [shop.db]     (default: a temporary file)

The consumer is this file too, started by the example; to watch a file
yourself, run ``python examples/orm_outbox.py --consume /abs/path/shop.db``
and type ``next 5`` (wait up to 5 s for the next event) or ``quit``.
"""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, String, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import alkpubsub
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
    ref: Mapped[str] = mapped_column(String(32), unique=True)
    lines: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime.datetime] = mapped_column(
        DateTime, default=lambda: datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    )


# -- the consumer: another process, reading the durable stream ----------------


async def consume(db: str) -> None:
    """Answer ``next <seconds>`` on stdin with the next event, or ``nothing``."""
    transport = await alkpubsub.connect(f"honker+durable://{db}")
    loop = asyncio.get_running_loop()
    async with transport.subscribe("orders:*", consumer="audit", start="earliest") as sub:
        print("ready", flush=True)
        while (line := await loop.run_in_executor(None, sys.stdin.readline)).startswith("next"):
            try:
                event = await sub.get(timeout=float(line.split()[1]))
            except TimeoutError:
                print("nothing", flush=True)
                continue
            print(f"{event.topic} {event.payload}", flush=True)
            await sub.ack(event)
    await transport.close()


class Consumer:
    """The parent's handle on the consumer process (line by line over pipes)."""

    def __init__(self, db: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--consume", str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._line() == "ready"

    def next(self, seconds: float) -> str:
        """The next event the consumer sees within ``seconds``, or "nothing"."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"next {seconds}\n")
        self.process.stdin.flush()
        return self._line()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("quit\n")
        self.process.stdin.close()
        self.process.wait(timeout=30)

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the consumer exited ({self.process.wait(timeout=30)})")
        return line.strip()


# -- the shop ------------------------------------------------------------------


async def place_order_async(db: Path, ref: str) -> None:
    """The async form: AsyncSession, and the awaited store transaction."""
    engine = create_async_engine(db)
    async with AsyncSession(engine) as session:
        session.add(Order(ref=ref, lines=[{"sku": "cup", "qty": 1}]))
        tx = await async_store_transaction(session)  # the session's own transaction
        await tx.publish("orders:created", {"ref": ref})
        await tx.enqueue("send-receipt", {"ref": ref})
        await session.commit()
    await engine.dispose()


def main(db: Path) -> None:
    engine = create_engine(db)  # sqlite+honker:///<db>: honker's SQLite, never sqlite3
    Base.metadata.create_all(engine)
    consumer = Consumer(db)

    # 1. Commit: the row, its event and its job exist together, from the commit on.
    with Session(engine) as session:
        session.add(Order(ref="A-1", lines=[{"sku": "tea", "qty": 2}]))
        session.flush()  # the INSERT has run, inside the session's write transaction
        tx = store_transaction(session)  # that same transaction
        event = tx.publish("orders:created", {"ref": "A-1"})
        tx.enqueue("send-receipt", {"ref": "A-1", "event": event.id})
        print("before commit, the consumer sees:", consumer.next(0.5))
        session.commit()
    print("after commit, the consumer sees:", consumer.next(10))

    # 2. Rollback: the row, the event and the job all disappear.
    with Session(engine) as session:
        session.add(Order(ref="A-2", lines=[]))
        tx = store_transaction(session)
        tx.publish("orders:created", {"ref": "A-2"})
        tx.enqueue("send-receipt", {"ref": "A-2"})
        session.rollback()
    with Session(engine) as session:
        rows = session.scalar(select(func.count()).where(Order.ref == "A-2"))
        events = session.scalar(text("SELECT count(*) FROM _honker_stream"))
        jobs = session.scalar(text("SELECT count(*) FROM _honker_live"))
        print(f"after rollback: {rows} A-2 rows, {events} events, {jobs} jobs in the file")

    # 3. The same with AsyncSession; the consumer's next event is A-3 (A-2 never existed).
    asyncio.run(place_order_async(db, "A-3"))
    print("after the async commit, the consumer sees:", consumer.next(10))
    consumer.close()

    with Session(engine) as session:
        refs = session.scalars(select(Order.ref).order_by(Order.id)).all()
        print("orders in the file:", ", ".join(refs))
    engine.dispose()
    with open_store(db) as store:  # a receipt worker: honker's own queue API
        jobs = store.honker.queue("send-receipt").claim_batch("receipts-1", 10)
        print("receipt jobs to send:", ", ".join(job.payload["ref"] for job in jobs))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--consume"]:
        asyncio.run(consume(sys.argv[2]))
    elif len(sys.argv) > 1:
        main(Path(sys.argv[1]).resolve())
    else:
        with tempfile.TemporaryDirectory() as folder:
            main(Path(folder) / "shop.db")
