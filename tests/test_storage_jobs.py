"""honker's queues, locks and scheduler in the same commit as rows and events,
checked with honker's own API from another process."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from alkpubsub import ConfigError, PayloadError
from alkpubsub.storage import Store, open_store

# A worker with honker's own API, in its own process. "count" reads (through
# honker's reader pool: what is committed) the jobs waiting in a queue; "claim"
# claims and acks what it can.
WORKER = """
import json, sys, honker
db = honker.open(sys.argv[1])
queue = db.queue(sys.argv[2])
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "count":
        rows = db.query("SELECT COUNT(*) AS n FROM _honker_live WHERE queue = ?", [sys.argv[2]])
        print(json.dumps(rows[0]["n"]), flush=True)
    else:
        jobs = queue.claim_batch("worker-1", 100)
        for j in jobs:
            j.ack()
        print(json.dumps([j.payload for j in jobs]), flush=True)
"""


class Worker:
    """honker's own API in another process, asked one thing at a time."""

    def __init__(self, child: asyncio.subprocess.Process) -> None:
        self.child = child

    @classmethod
    async def start(cls, path: str, queue: str) -> Worker:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            path,
            queue,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker = cls(child)
        assert await worker._line() == "ready"
        return worker

    async def _line(self) -> str:
        assert self.child.stdout is not None
        return (await asyncio.wait_for(self.child.stdout.readline(), 30)).decode().strip()

    async def ask(self, what: str) -> object:
        assert self.child.stdin is not None
        self.child.stdin.write(what.encode() + b"\n")
        return json.loads(await self._line())

    async def close(self) -> None:
        assert self.child.stdin is not None
        self.child.stdin.close()
        await asyncio.wait_for(self.child.wait(), 30)


async def claim(path: str, queue: str) -> list[object]:
    worker = await Worker.start(path, queue)
    try:
        claimed = await worker.ask("claim")
    finally:
        await worker.close()
    assert isinstance(claimed, list)
    return claimed


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = open_store(tmp_path / "app.db")
    with store.transaction() as tx:
        tx.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, ref TEXT UNIQUE)")
    return store


async def test_a_job_row_and_event_commit_together_and_a_worker_sees_the_job_after(
    store: Store,
) -> None:
    worker = await Worker.start(store.path, "send-receipt")
    try:
        async with store.atransaction() as tx:
            await tx.execute("INSERT INTO orders (ref) VALUES ('o-1')")
            event = await tx.publish("orders:created", {"ref": "o-1"})
            job = await tx.enqueue("send-receipt", {"ref": "o-1", "event": event.id})
            # Not committed yet: the worker in another process sees no job.
            assert await worker.ask("count") == 0
        assert job >= 1
        assert await worker.ask("count") == 1
        assert await worker.ask("claim") == [{"ref": "o-1", "event": event.id}]
    finally:
        await worker.close()
    assert store.stream_head("events") == event.offset


async def test_a_rollback_leaves_no_job_no_row_and_no_event(store: Store) -> None:
    with pytest.raises(RuntimeError, match="abort"), store.transaction() as tx:
        tx.execute("INSERT INTO orders (ref) VALUES ('o-2')")
        tx.publish("orders:created", {"ref": "o-2"})
        tx.enqueue("send-receipt", {"ref": "o-2"})
        raise RuntimeError("abort")
    assert await claim(store.path, "send-receipt") == []
    assert store.honker.query("SELECT COUNT(*) AS n FROM orders", [])[0]["n"] == 0
    assert store.stream_head("events") == 0


async def test_a_delayed_job_is_not_claimable_yet(store: Store) -> None:
    with store.transaction() as tx:
        tx.enqueue("later", {"n": 1}, delay=3600)
        tx.enqueue("later", {"n": 2})
    assert await claim(store.path, "later") == [{"n": 2}]


def test_locks_in_a_transaction_are_honkers_locks(store: Store) -> None:
    with store.transaction() as tx:
        assert tx.acquire_lock("nightly", owner="a", ttl=60)
        assert not tx.acquire_lock("nightly", owner="b", ttl=60)
        assert tx.renew_lock("nightly", owner="a", ttl=120)
    # honker's own lock object sees it held.
    import honker

    with pytest.raises(honker.LockHeld), store.honker.lock("nightly", owner="c"):
        pass
    with store.transaction() as tx:
        tx.release_lock("nightly", owner="a")
        assert tx.acquire_lock("nightly", owner="b")


def test_a_lock_taken_in_a_rolled_back_transaction_is_not_held(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction() as tx:
        assert tx.acquire_lock("l", owner="a")
        raise RuntimeError("abort")
    with store.transaction() as tx:
        assert tx.acquire_lock("l", owner="b")


async def test_a_schedule_is_registered_with_the_commit(store: Store) -> None:
    async with store.atransaction() as tx:
        await tx.schedule("digest", queue="emails", cron="*/5 * * * *", payload={"k": 1})
        await tx.schedule("ping", queue="emails", cron="@every 30s")
    rows = store.honker.query(
        "SELECT name, queue, cron_expr, payload FROM _honker_scheduler_tasks ORDER BY name", []
    )
    assert [(r["name"], r["queue"], r["cron_expr"]) for r in rows] == [
        ("digest", "emails", "*/5 * * * *"),
        ("ping", "emails", "@every 30s"),
    ]
    assert json.loads(rows[0]["payload"]) == {"k": 1}
    async with store.atransaction() as tx:
        assert await tx.unschedule("ping")
        assert not await tx.unschedule("ping")


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda tx: tx.enqueue("", {}), ConfigError),
        (lambda tx: tx.enqueue("q", {"x": float("nan")}), PayloadError),
        (lambda tx: tx.enqueue("q", {}, delay=-1), ConfigError),
        (lambda tx: tx.enqueue("q", {}, max_attempts=0), ConfigError),
        (lambda tx: tx.acquire_lock("l", owner="a", ttl=0), ConfigError),
        (lambda tx: tx.schedule("s", queue="q", cron="every tuesday"), ConfigError),
    ],
)
def test_bad_arguments_raise_pubsub_errors_and_write_nothing(
    store: Store, call: object, error: type[Exception]
) -> None:
    with pytest.raises(error), store.transaction() as tx:
        call(tx)  # type: ignore[operator]
    assert store.honker.query("SELECT COUNT(*) AS n FROM _honker_live", [])[0]["n"] == 0


# Run in a child with a deadline: before the guard, these calls hung the process.
HANG = """
import asyncio, sys
import alkpubsub
from alkpubsub.storage import open_store

async def main(case):
    store = open_store(sys.argv[1])
    other = open_store(sys.argv[1])  # another handle on the same file, same process
    async with store.atransaction() as tx:
        await tx.execute("INSERT INTO orders (ref) VALUES ('inside')")
        try:
            if case == "enqueue":
                store.honker.queue("q").enqueue({"n": 1})
            elif case == "queue":
                other.honker.queue("new-queue")
            elif case == "lock":
                with other.honker.lock("l", owner="me"):
                    pass
            elif case == "transaction":
                with other.transaction() as tx2:
                    tx2.execute("INSERT INTO orders (ref) VALUES ('other')")
        except alkpubsub.TransactionOpen as exc:
            print("refused:", type(exc).__name__, flush=True)
        # Reads are fine inside the block.
        print("reads:", store.honker.query("SELECT COUNT(*) AS n FROM orders", [])[0]["n"])
    # After the block the same calls work.
    store.honker.queue("q").enqueue({"n": 2})
    print("after: ok", flush=True)

asyncio.run(main(sys.argv[2]))
"""


@pytest.mark.parametrize("case", ["enqueue", "queue", "lock", "transaction"])
async def test_a_honker_write_on_the_loop_during_an_async_transaction_raises_not_hangs(
    store: Store, case: str
) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HANG,
        store.path,
        case,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(child.communicate(), 20)
    except TimeoutError:
        child.kill()
        await child.wait()
        pytest.fail(f"{case}: the process hung")
    assert child.returncode == 0, err.decode()[-2000:]
    lines = out.decode().splitlines()
    assert lines == ["refused: TransactionOpen", "reads: 0", "after: ok"], lines
