"""An order row, its `orders:created` event and a `send-receipt` job in one commit.

The shop process writes all three in one store transaction. Two other OS
processes act on the commit: a receipt worker that uses honker's own queue API
(as a service in another language sharing the file would), and an analytics
consumer reading the durable event stream. Neither sees anything before the
commit, and a transaction that fails (a duplicate order ref) leaves no row, no
event and no job.

Run: python examples/outbox_queue.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import alkpubsub
from alkpubsub.storage import Store, open_store

# The receipt worker: honker's own API, nothing from alkpubsub.
WORKER = """
import json, sys, time, honker
db = honker.open(sys.argv[1])
queue = db.queue("send-receipt")
sent, deadline = [], time.monotonic() + 20
while len(sent) < int(sys.argv[2]) and time.monotonic() < deadline:
    for job in queue.claim_batch("receipts-1", 10):
        sent.append(job.payload["ref"])
        job.ack()
    time.sleep(0.05)
print(json.dumps(sent))
"""


async def place_order(store: Store, ref: str, total: int) -> None:
    """One commit: the row, its event and its receipt job."""
    async with store.atransaction() as tx:
        await tx.execute("INSERT INTO orders (ref, total) VALUES (?, ?)", (ref, total))
        event = await tx.publish("orders:created", {"ref": ref, "total": total})
        await tx.enqueue("send-receipt", {"ref": ref, "event": event.id})


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "shop.db"
        store = open_store(db)
        with store.transaction() as tx:
            tx.execute("CREATE TABLE orders (ref TEXT PRIMARY KEY, total INTEGER NOT NULL)")

        events = await alkpubsub.connect(f"honker+durable://{db}")
        analytics = events.subscribe("orders:>", consumer="analytics", start="earliest")
        await analytics.start()
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, str(db), "3", stdout=asyncio.subprocess.PIPE
        )

        for ref, total in (("o-1", 30), ("o-2", 12), ("o-3", 55)):
            await place_order(store, ref, total)
        try:
            await place_order(store, "o-2", 99)  # a duplicate ref: refused whole
        except alkpubsub.ConstraintViolation as exc:
            print(f"refused: {exc.kind} on {exc.table}({', '.join(exc.columns)})")

        out, _ = await asyncio.wait_for(worker.communicate(), 30)
        print("receipts sent by the worker:", ", ".join(json.loads(out)))
        seen = []
        for _ in range(3):
            event = await analytics.get(timeout=10)
            seen.append(event.payload["ref"])
            await analytics.ack(event)
        print("analytics saw:", ", ".join(seen))
        rows = store.honker.query("SELECT COUNT(*) AS n FROM orders", [])[0]["n"]
        jobs = store.honker.query("SELECT COUNT(*) AS n FROM _honker_live", [])[0]["n"]
        print(f"database: {rows} orders, {store.stream_head('events')} events, {jobs} jobs left")
        await analytics.close()
        await events.close()
        store.close()


if __name__ == "__main__":
    asyncio.run(main())
