"""Single node, no server: two processes share one SQLite file.

The writer inserts order rows and publishes an event for each in the same
transaction. The consumer (another OS process) reads the durable stream as
consumer "billing" and acks what it has processed. Midway the writer kills the
consumer with SIGKILL, keeps writing, then starts a new consumer process, which
resumes after the last acked event and catches up: nothing is lost.

Run: python examples/single_node.py            (make demo)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import alkpubsub
from alkpubsub.storage import Store, open_store

ORDERS = 30


async def consume(db: Path, log_path: Path) -> None:
    """Child process: process orders durably; log each processed order id."""
    transport = await alkpubsub.connect(f"honker+durable://{db}")
    async with (
        transport,
        transport.subscribe("orders:>", consumer="billing", start="earliest") as sub,
    ):
        print(f"  consumer[{os.getpid()}]: subscribed as 'billing'", flush=True)
        with log_path.open("a") as log:
            async for event in sub:
                log.write(f"{event.payload['order']}\n")
                log.flush()
                await sub.ack(event)
                await asyncio.sleep(0.01)  # pretend to work, so the kill lands mid-stream


def start_consumer(db: Path, log_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--consume", str(db), str(log_path)])


def processed(log_path: Path) -> list[int]:
    return [int(x) for x in log_path.read_text().split()] if log_path.exists() else []


def wait_for(log_path: Path, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(set(processed(log_path))) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"consumer processed {len(set(processed(log_path)))} of {count}")
        time.sleep(0.02)


def write_orders(store: Store, first: int, last: int) -> None:
    for n in range(first, last + 1):
        with store.transaction() as tx:
            tx.execute("INSERT INTO orders(id, amount) VALUES (?, ?)", (n, n * 10))
            tx.publish(f"orders:created:{n}", {"order": n, "amount": n * 10})


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db, log_path = Path(tmp) / "app.db", Path(tmp) / "processed.txt"
        store = open_store(db)
        with store.transaction() as tx:
            tx.execute("CREATE TABLE orders(id INTEGER PRIMARY KEY, amount INTEGER)")
        print(f"writer: one SQLite file, no server: {db.name}")

        consumer = start_consumer(db, log_path)
        write_orders(store, 1, ORDERS // 2)
        print(
            f"writer: committed orders 1-{ORDERS // 2}, each row with its event in one transaction"
        )
        wait_for(log_path, 5)
        consumer.send_signal(signal.SIGKILL)
        consumer.wait()
        done_before = len(set(processed(log_path)))
        print(f"writer: killed the consumer with SIGKILL after it processed {done_before} orders")

        write_orders(store, ORDERS // 2 + 1, ORDERS)
        print(f"writer: committed orders {ORDERS // 2 + 1}-{ORDERS} while no consumer ran")
        try:
            with store.transaction() as tx:
                tx.execute("INSERT INTO orders(id, amount) VALUES (?, ?)", (999, 0))
                tx.publish("orders:created:999", {"order": 999, "amount": 0})
                raise RuntimeError("payment declined")
        except RuntimeError:
            print("writer: order 999 failed and rolled back: no row, no event")

        consumer = start_consumer(db, log_path)
        wait_for(log_path, ORDERS)
        consumer.send_signal(signal.SIGTERM)
        consumer.wait()
        seen = processed(log_path)
        rows = store.honker.query("SELECT COUNT(*) AS n FROM orders")[0]["n"]
        missing = set(range(1, ORDERS + 1)) - set(seen)
        print(
            f"consumer: caught up: {len(set(seen))} of {ORDERS} orders processed, "
            f"{len(missing)} lost, {len(seen) - len(set(seen))} redelivered after the kill"
        )
        print(f"database: {rows} order rows; order 999 present: {999 in seen}")
        store.close()
        if missing or 999 in seen or rows != ORDERS:
            raise SystemExit("demo failed: see above")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--consume":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(consume(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        main()
