"""Honker rows: ``honker://`` and ``honker+durable://`` next to honker used directly.

Raw honker is synchronous: its publishes run on the event loop (which our
transports must not do), one transaction each or one per batch of 500, with the
publisher yielding to the loop every 64 events so the listener runs alongside.
Raw receivers are ``db.listen(channel)`` and ``db.stream(name).subscribe(...)``.
Every run uses a fresh database file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from .. import ours
from ..case import Case, Metric, Target
from ..env import ROOT, Env
from ..measure import (
    BenchError,
    CpuLoad,
    Handoff,
    Latency,
    Throughput,
    check_seq,
    clock,
    payload,
    transfer,
)

TOPIC = ours.TOPIC
BATCH = ours.BATCH
STREAM = "events"
YIELD_EVERY = 64

_NEEDS = ("honker", "alkpubsub.transports.honker")
_NEEDS_DURABLE = ("honker", "alkpubsub.transports.honker_durable")


@contextlib.contextmanager
def _raw_db(path: Path) -> Any:
    import honker

    db = honker.open(str(path))
    try:
        yield db
    finally:
        db.close()


def _raw_publisher(
    db: Any, *, durable: bool, batch: int | None
) -> Callable[[int], Awaitable[None]]:
    """Raw honker publishes on the loop: one tx each, or one tx per ``batch``."""
    stream = db.stream(STREAM) if durable else None

    def write(tx: Any, i: int) -> None:
        if stream is not None:
            stream.publish(payload(i), tx=tx)
        else:
            tx.notify(TOPIC, payload(i))

    async def publish(n: int) -> None:
        if batch is None:
            for i in range(n):
                with db.transaction() as tx:
                    write(tx, i)
                if i % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)
            return
        for start in range(0, n, batch):
            with db.transaction() as tx:
                for i in range(start, min(start + batch, n)):
                    write(tx, i)
            await asyncio.sleep(0)

    return publish


def _raw_events(db: Any, *, durable: bool) -> AsyncIterator[Any]:
    """The raw receiver, created before publishing: a listener, or a stream
    consumer (offsets saved every 1000 events, honker's default)."""
    if durable:
        iterator: AsyncIterator[Any] = db.stream(STREAM).subscribe(consumer="bench")
        return iterator
    listener: AsyncIterator[Any] = db.listen(TOPIC)
    return listener


def cases(env: Env) -> list[Case]:
    """The Honker rows."""

    def url(durable: bool = False, query: str = "") -> Callable[[], str]:
        scheme = "honker+durable" if durable else "honker"
        return lambda: f"{scheme}://{env.path('ours')}{query}"

    async def raw_transfer(n: int, *, durable: bool, batch: int | None = None) -> Throughput:
        with _raw_db(env.path("raw")) as db:
            events = _raw_events(db, durable=durable)

            async def receive(n: int) -> None:
                for i in range(n):
                    check_seq((await anext(events)).payload, i)

            return await transfer(n, _raw_publisher(db, durable=durable, batch=batch), receive)

    async def raw_publish_only(n: int, *, durable: bool) -> Throughput:
        with _raw_db(env.path("raw")) as db:
            publish = _raw_publisher(db, durable=durable, batch=None)
            start = clock()
            await publish(n)
            return Throughput(n, clock() - start)

    async def raw_latency(n: int, *, durable: bool) -> Latency:
        handoff = Handoff()
        with _raw_db(env.path("raw")) as db:
            events = _raw_events(db, durable=durable)
            stream = db.stream(STREAM)

            async def consume() -> None:
                async for event in events:
                    handoff.deliver(event.payload)

            async def publish(i: int) -> None:
                with db.transaction() as tx:
                    if durable:
                        stream.publish(payload(i), tx=tx)
                    else:
                        tx.notify(TOPIC, payload(i))

            task = asyncio.create_task(consume())
            try:
                return await handoff.round_trips(n, publish)
            finally:
                task.cancel()

    async def cross_process(n: int, *, raw: bool) -> Latency:
        path = env.path("xproc")
        if raw:
            with _raw_db(path) as db:
                events = _raw_events(db, durable=False)
                return await _cross_process_latency(
                    n, events, ["publish-raw", str(path), TOPIC], lambda e: e.payload
                )
        import alkpubsub

        address = f"honker://{path}"
        transport = await alkpubsub.connect(address)
        try:
            async with transport.subscribe(TOPIC) as sub:
                return await _cross_process_latency(
                    n, sub, ["publish-ours", address, TOPIC], lambda e: e.payload
                )
        finally:
            await transport.close()

    async def many_topics_latency(n: int, *, topics: int) -> Latency:
        """Our p50 with ``topics`` exact-topic subscriptions open on one file."""
        import alkpubsub

        address = f"honker://{env.path('topics')}"
        pub = await alkpubsub.connect(address)
        subt = await alkpubsub.connect(address)
        handoff = Handoff()
        try:
            async with contextlib.AsyncExitStack() as stack:
                for i in range(1, topics):
                    await stack.enter_async_context(subt.subscribe(f"bench:t{i}"))
                sub = await stack.enter_async_context(subt.subscribe("bench:t0"))

                async def consume() -> None:
                    async for event in sub:
                        handoff.deliver(event.payload)

                async def publish(i: int) -> None:
                    await pub.publish("bench:t0", payload(i))

                task = asyncio.create_task(consume())
                try:
                    return await handoff.round_trips(n, publish)
                finally:
                    task.cancel()
        finally:
            await subt.close()
            await pub.close()

    async def idle(seconds: int, *, count: int, raw: bool) -> CpuLoad:
        path = env.path("idle")
        args = (["idle-raw", str(path)] if raw else ["idle-ours", f"honker://{path}"]) + [
            str(count),
            str(seconds),
        ]
        out = await _run_child(args, timeout=seconds + 60)
        data = json.loads(out.strip().splitlines()[-1])
        return CpuLoad(float(data["cpu"]), float(data["wall"]))

    def case(
        name: str,
        what: str,
        o: Callable[[int], Awaitable[Any]],
        r: Callable[[int], Awaitable[Any]],
        n: int,
        quick_n: int,
        *,
        durable: bool = False,
        metric: Metric = "throughput",
        baseline: str = "raw",
        raw_needs: tuple[str, ...] = ("honker",),
        target: Target | None = None,
        repeat: int | None = None,
        warmup: bool = True,
    ) -> Case:
        return Case(
            "honker", name, metric, what, o, r, n, quick_n,
            baseline=baseline, ours_needs=_NEEDS_DURABLE if durable else _NEEDS,
            raw_needs=raw_needs, target=target, repeat=repeat, warmup=warmup,
        )  # fmt: skip

    return [
        case(
            "publish->receive, awaited each",
            "honker:// publish awaited each, another transport on the file receives; "
            "raw: one tx.notify per transaction + db.listen. Raw commits 64 events between "
            "yields, blocking the loop ~5 ms each time (ours never blocks it), and its "
            "listener reads once per 64 commits",
            lambda n: ours.publish_receive(url(), n),
            lambda n: raw_transfer(n, durable=False),
            20_000,
            500,
        ),
        case(
            "publish->receive, batches of 500",
            "publish_many(500) vs 500 tx.notify in one transaction; db.listen receives",
            lambda n: ours.publish_receive(url(), n, batch=BATCH),
            lambda n: raw_transfer(n, durable=False, batch=BATCH),
            50_000,
            1_000,
        ),
        case(
            "1-in-flight latency",
            "publish one, a subscriber task hands it back, repeat (same process)",
            lambda n: ours.latency(url(), n),
            lambda n: raw_latency(n, durable=False),
            2_000,
            200,
            metric="latency",
        ),
        case(
            "durable publish->receive, awaited each",
            "honker+durable:// publish awaited each, a named consumer receives and acks each; "
            "raw: stream.publish one tx each + stream.subscribe(consumer=...), 64 commits "
            "between yields to the loop as above",
            lambda n: ours.publish_receive(url(True), n, consumer="bench"),
            lambda n: raw_transfer(n, durable=True),
            20_000,
            500,
            durable=True,
        ),
        case(
            "durable publish->receive, batches of 500",
            "publish_many(500) vs 500 stream.publish in one transaction; consumer as above",
            lambda n: ours.publish_receive(url(True), n, batch=BATCH, consumer="bench"),
            lambda n: raw_transfer(n, durable=True, batch=BATCH),
            50_000,
            1_000,
            durable=True,
        ),
        case(
            "durable publish->receive, ack=saved",
            "as the row above, but each ack returns only once the consumer's position is "
            "committed (?ack=saved: no acked event is delivered again after a crash)",
            lambda n: ours.publish_receive(url(True, "?ack=saved"), n, consumer="bench"),
            lambda n: raw_transfer(n, durable=True),
            20_000,
            500,
            durable=True,
        ),
        case(
            "durable ack=saved vs ack=batched",
            "the same publish->receive with acks awaited until saved, next to the default "
            "mode (ours both sides): what saved acks cost",
            lambda n: ours.publish_receive(url(True, "?ack=saved"), n, consumer="bench"),
            lambda n: ours.publish_receive(url(True), n, consumer="bench"),
            20_000,
            500,
            durable=True,
            baseline="ack=batched",
            raw_needs=_NEEDS_DURABLE,
        ),
        case(
            "durable 1-in-flight latency",
            "publish one, a named consumer task hands it back and acks, repeat",
            lambda n: ours.latency(url(True), n, consumer="bench"),
            lambda n: raw_latency(n, durable=True),
            2_000,
            200,
            durable=True,
            metric="latency",
        ),
        case(
            "group commit, 8 publishers (durable)",
            "8 tasks each awaiting publish in turn (grouped into shared commits) vs raw "
            "stream.publish one tx each, serial on the loop (raw's fastest one-tx-each); "
            "publish only",
            lambda n: ours.publish_only(url(True), n, concurrency=8),
            lambda n: raw_publish_only(n, durable=True),
            20_000,
            800,
            durable=True,
            target=Target("ratio_min", 2.0),
            repeat=5,  # short, noisy runs (WAL checkpoints): more of them
        ),
        case(
            "group commit, 16 publishers (durable)",
            "as above with 16 tasks",
            lambda n: ours.publish_only(url(True), n, concurrency=16),
            lambda n: raw_publish_only(n, durable=True),
            20_000,
            800,
            durable=True,
            target=Target("ratio_min", 2.0),
            repeat=5,  # short, noisy runs (WAL checkpoints): more of them
        ),
        case(
            "group commit, 8 publishers (ephemeral)",
            "8 tasks awaiting honker:// publish vs raw tx.notify one tx each; publish only",
            lambda n: ours.publish_only(url(), n, concurrency=8),
            lambda n: raw_publish_only(n, durable=False),
            20_000,
            800,
            target=Target("ratio_min", 2.0),
            repeat=5,  # short, noisy runs (WAL checkpoints): more of them
        ),
        case(
            "group commit, 16 publishers (ephemeral)",
            "16 tasks awaiting honker:// publish vs raw tx.notify one tx each; publish only",
            lambda n: ours.publish_only(url(), n, concurrency=16),
            lambda n: raw_publish_only(n, durable=False),
            20_000,
            800,
            target=Target("ratio_min", 2.0),
            repeat=5,  # short, noisy runs (WAL checkpoints): more of them
        ),
        case(
            "cross-process wake latency",
            "a child process publishes one event (stamped with the shared monotonic clock), "
            "this process receives it; raw: child tx.notify, parent db.listen",
            lambda n: cross_process(n, raw=False),
            lambda n: cross_process(n, raw=True),
            1_000,
            100,
            metric="latency",
        ),
        case(
            "10,000 subscribed topics",
            "1-in-flight p50 with 10,000 distinct exact-topic subscriptions open on the file "
            "vs with 1 (ours both)",
            lambda n: many_topics_latency(n, topics=10_000),
            lambda n: many_topics_latency(n, topics=1),
            2_000,
            200,
            metric="latency",
            baseline="1 subscription",
            raw_needs=_NEEDS,
            target=Target("ratio_max", 1.5),
        ),
        case(
            "idle CPU, 100 subscriptions",
            "CPU used by a process idling n seconds with 100 subscriptions on one file "
            "vs with 1 (ours both; one shared watcher should serve all)",
            lambda n: idle(n, count=100, raw=False),
            lambda n: idle(n, count=1, raw=False),
            3,
            1,
            metric="cpu",
            baseline="1 subscription",
            raw_needs=_NEEDS,
            target=Target("ratio_max", 1.5),
            repeat=1,
            warmup=False,
        ),
        case(
            "idle CPU, 1 subscription",
            "CPU used by a process idling n seconds with 1 subscription vs raw honker "
            "with 1 db.listen (one watcher)",
            lambda n: idle(n, count=1, raw=False),
            lambda n: idle(n, count=1, raw=True),
            3,
            1,
            metric="cpu",
            repeat=1,
            warmup=False,
        ),
    ]


async def _run_child(args: list[str], *, timeout: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.child", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"bench.child {args[0]} exited {proc.returncode}: {err.decode()[-500:]}")
    return out.decode()


async def _cross_process_latency(
    n: int, events: AsyncIterator[Any], child_args: list[str], payload_of: Callable[[Any], Any]
) -> Latency:
    """Ask a child to publish ``seq`` 0..n-1 one at a time; each sample runs
    from the child's stamp just before its publish call to our receipt."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.child", *child_args,
        cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            ready = await proc.stdout.readline()
        if ready.strip() != b"ready":
            raise BenchError(f"bench.child did not start: {ready!r}")
        samples: list[float] = []
        for i in range(n):
            proc.stdin.write(b"%d\n" % i)
            await proc.stdin.drain()
            async with asyncio.timeout(10):
                value = payload_of(await anext(events))
            received = clock()
            check_seq(value, i)
            samples.append(received - float(value["t"]))
        return Latency(tuple(samples))
    finally:
        proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
