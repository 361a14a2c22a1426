"""Two nodes, one broker: each order row and its event commit together on node A,
and node B processes every event once, across a relay killed with SIGKILL.

    node A (this process)                         node B (a child process)
    ["memory://", "honker+durable:///<A>.db"]     ["memory://", "honker+durable:///<B>.db"]
      | one transaction: INSERT order               ^ durable consumer "billing",
      | + tx.publish("orders:created")              | acks each event, counts by id
      v                                             |
    A.db --[alkpubsub relay]--> broker stream --[alkpubsub relay]--> B.db
            consumer "outbox"   (nats+durable or    consumer "node-b"
            SIGKILLed mid-way,   redis+durable)
            then restarted

Node A writes N orders, each row with its ``orders:created`` event in one store
transaction, while a live subscriber on A's composite counts what it receives
(those events reach it through the composite's Honker leg: ``tx.publish`` writes
the file, not the in-memory leg). A relay process forwards A's committed events
to the broker; after half of the orders node A kills it with SIGKILL, keeps
writing, and starts a new one, which resumes after the last event the first one
acked. Node B runs its own relay from the broker into its own file and a durable
consumer on its composite. At the end node A prints what each side saw, how
many copies the broker holds, and the commit-on-A -> receipt-on-B latency.

Run: python examples/multi_node.py --broker nats://127.0.0.1:4222
     python examples/multi_node.py --broker redis://127.0.0.1:6379/0
(see docs/multi-node.md). It exits non-zero if B did not get every event exactly
once, or A's local subscriber did not get every event once. Each run uses a new
broker stream (printed at the start) and leaves it there: remove it with
``nats stream rm ORDERS_...`` or ``redis-cli DEL orders-...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import alkpubsub
from alkpubsub.storage import open_store

ORDERS = 500
RATE = 250.0
"""Orders node A commits per second (so the relay's kill lands mid-stream)."""
QUIET = 1.0
"""Seconds node B keeps listening after its last event, for late duplicates."""
DEADLINE = 30.0
"""Seconds node B waits for all events at most."""


def durable_url(broker: str) -> str:
    """The broker's durable URL with a stream of its own (one per run)."""
    scheme, rest = broker.split("://", 1)
    run = uuid.uuid4().hex[:12]
    if scheme == "nats":
        return f"nats+durable://{rest}?stream=ORDERS_{run}"
    if scheme == "redis":
        return f"redis+durable://{rest}?stream=orders-{run}"
    raise SystemExit(f"--broker must be nats://HOST:PORT or redis://HOST:PORT, not {broker!r}")


def composite_settings(db: Path) -> alkpubsub.Settings:
    """Each node's composite: an in-process leg first, then its own Honker file."""
    return alkpubsub.Settings.load(url=["memory://", f"honker+durable://{db}"])


class Child:
    """A child process whose output lines are echoed with a prefix."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._pump = asyncio.create_task(self._echo())

    @classmethod
    async def start(cls, name: str, *argv: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        return cls(name, proc)

    @classmethod
    async def relay(cls, name: str, source: str, target: str, consumer: str) -> Child:
        """``alkpubsub relay --from SOURCE --to TARGET --consumer NAME`` in a new process."""
        argv = ("relay", "--from", source, "--to", target, "--consumer", consumer)
        return await cls.start(name, "-m", "alkpubsub.cli", *argv)

    async def _echo(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode().rstrip()
            self.lines.append(line)
            if not line.startswith("result "):
                print(f"  {self.name} | {line}", flush=True)
            self._changed.set()
        self._changed.set()

    async def wait_for(self, text: str, timeout: float = 20) -> str:
        """The first output line starting with ``text``; fail if the child exits first."""
        async with asyncio.timeout(timeout):
            while True:
                found = next((line for line in self.lines if line.startswith(text)), None)
                if found is not None:
                    return found
                if self._pump.done():
                    raise SystemExit(f"{self.name} exited ({self.proc.returncode}) before {text!r}")
                self._changed.clear()
                await self._changed.wait()

    async def kill(self) -> None:
        """SIGKILL: no chance to finish or ack anything in flight."""
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        await self._pump

    async def stop(self) -> None:
        """SIGTERM (a relay finishes its batch in flight), SIGKILL after 5 s."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        await self._pump


# -- node B -------------------------------------------------------------------


async def node_b(broker_url: str, count: int) -> None:
    """Relay the broker into B's own file; consume it durably; report as JSON."""
    with tempfile.TemporaryDirectory(prefix="node-b-") as tmp:
        db = Path(tmp) / "b.db"
        first_seen: dict[str, float] = {}
        latencies: list[float] = []
        duplicates = 0
        async with await alkpubsub.connect(composite_settings(db)) as node:
            sub = node.subscribe("orders:>", consumer="billing", start="earliest")
            async with sub:
                relay = await Child.relay("relay B", broker_url, f"honker+durable://{db}", "node-b")
                await relay.wait_for("")  # its first line: connected to both sides
                print("consuming as 'billing' from b.db", flush=True)
                deadline = time.monotonic() + DEADLINE
                while time.monotonic() < deadline:
                    try:
                        event = await sub.get(timeout=QUIET)
                    except TimeoutError:
                        if len(first_seen) >= count:
                            break  # everything arrived and nothing came back for QUIET s
                        continue
                    now = time.time()
                    if event.id in first_seen:
                        duplicates += 1
                    else:
                        first_seen[event.id] = now
                        latencies.append(now - event.published_at.timestamp())
                    await sub.ack(event)
                await relay.stop()
        result = {"unique": len(first_seen), "duplicates": duplicates, "latencies": latencies}
        print("result " + json.dumps(result), flush=True)


# -- node A -------------------------------------------------------------------


async def local_subscriber(
    sub: alkpubsub.Subscription, seen: dict[str, int], count: int, all_seen: asyncio.Event
) -> None:
    """Count, by event id, what a live subscriber on A's composite receives."""
    async for event in sub:
        seen[event.id] = seen.get(event.id, 0) + 1
        if len(seen) == count:
            all_seen.set()


async def broker_copies(broker_url: str) -> tuple[int, int]:
    """(messages, distinct ids) in the run's broker stream, read from the start."""
    ids: list[str] = []
    async with (
        await alkpubsub.connect(broker_url) as broker,
        broker.subscribe("orders:>", start="earliest") as sub,
    ):
        with contextlib.suppress(TimeoutError):
            while True:
                ids.append((await sub.get(timeout=QUIET)).id)
    return len(ids), len(set(ids))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))]


async def node_a(broker: str, count: int, rate: float) -> int:
    broker_url = durable_url(broker)
    with tempfile.TemporaryDirectory(prefix="node-a-") as tmp:
        db = Path(tmp) / "a.db"
        store = open_store(db)
        with store.transaction() as tx:
            tx.execute("CREATE TABLE orders(id INTEGER PRIMARY KEY, amount INTEGER)")
        print("node A: a.db, composite [memory://, honker+durable://.../a.db]")
        print(f"broker: {alkpubsub.redact_url(broker_url)}")

        b = await Child.start("node B", __file__, "--role", "node-b", broker_url, str(count))
        await b.wait_for("consuming")
        local: dict[str, int] = {}
        node = await alkpubsub.connect(composite_settings(db))
        # A live subscriber on A's composite. tx.publish below writes a.db, not
        # the in-memory leg: the events reach this subscriber through the
        # composite's Honker leg, once each (their origin is the store's, so
        # the composite does not drop them as echoes of its own publishes).
        sub = node.subscribe("orders:>")
        await sub.start()  # live from here: every later commit reaches it
        all_local = asyncio.Event()
        counting = asyncio.create_task(local_subscriber(sub, local, count, all_local))

        source = f"honker+durable://{db}"
        relay = await Child.relay("relay A#1", source, broker_url, "outbox")
        await relay.wait_for("")  # its first line: connected to both sides
        restarts = 0
        for n in range(1, count + 1):
            async with store.atransaction() as atx:  # the row and its event: one commit
                await atx.execute("INSERT INTO orders(id, amount) VALUES (?, ?)", (n, n * 10))
                await atx.publish("orders:created", {"order": n, "amount": n * 10})
            if n == count // 2:
                await relay.kill()
                print(f"node A: killed relay A#1 with SIGKILL after {n} commits; writing on")
                relay = await Child.relay("relay A#2", source, broker_url, "outbox")
                restarts += 1
            await asyncio.sleep(1 / rate)
        print(f"node A: committed {count} orders, each row with its event in one transaction")

        reported = await b.wait_for("result", timeout=DEADLINE + 10)
        await b.stop()
        await relay.stop()
        with contextlib.suppress(TimeoutError):  # the last local deliveries
            await asyncio.wait_for(all_local.wait(), 5)
        await sub.close()
        await counting
        await node.close()
        rows = store.honker.query("SELECT COUNT(*) AS n FROM orders")[0]["n"]
        store.close()

    result: dict[str, Any] = json.loads(reported.removeprefix("result "))
    copies, distinct = await broker_copies(broker_url)
    latencies: list[float] = result["latencies"] or [float("nan")]
    unique_b, dup_b = int(result["unique"]), int(result["duplicates"])
    dup_local = sum(local.values()) - len(local)
    print(f"events written on A:         {count} ({rows} order rows)")
    print(f"received by A's local sub:   {len(local)} unique, {dup_local} duplicates")
    print(f"received on B:               {unique_b} unique, {dup_b} duplicates")
    print(f"broker copies:               {copies} messages, {distinct} distinct ids")
    print(f"relay restarts:              {restarts} (SIGKILL after {count // 2} commits)")
    print(
        f"latency commit on A -> B:    p50 {percentile(latencies, 50) * 1e3:.1f} ms, "
        f"p99 {percentile(latencies, 99) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms "
        "(the tail: orders committed while no relay ran)"
    )

    # The relay forwards at least once (relay A#2 sends again what A#1 sent but
    # had not acked); the broker drops a re-sent event id (JetStream
    # Nats-Msg-Id, redis+durable's dedupe_window), so it holds one copy per
    # event, and B's relay and consumer see none twice.
    ok = (
        unique_b == count
        and dup_b == 0
        and copies == distinct == count
        and len(local) == count
        and dup_local == 0
    )
    if not ok:
        print("multi-node demo FAILED: see above")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", help="nats://HOST:PORT or redis://HOST:PORT[/DB]")
    parser.add_argument("--orders", type=int, default=ORDERS)
    parser.add_argument("--rate", type=float, default=RATE, help="orders committed per second")
    parser.add_argument("--role", choices=["node-a", "node-b"], default="node-a")
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)  # node B: URL COUNT
    args = parser.parse_args()
    if args.role == "node-b":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(node_b(args.args[0], int(args.args[1])))
        return 0
    if not args.broker:
        parser.error("--broker is required")
    return asyncio.run(node_a(args.broker, args.orders, args.rate))


if __name__ == "__main__":
    sys.exit(main())
