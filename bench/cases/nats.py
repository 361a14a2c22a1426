"""NATS rows: ``nats://`` and ``nats+durable://`` next to nats-py used directly.

The raw side sends ``json.dumps(payload)`` and decodes with ``json.loads`` in a
subscription callback (nats-py's fast path); ours sends the event envelope.
JetStream rows use a fresh file-storage stream per run on both sides (ours:
``?stream=BENCHn``, raw: ``RAWn``), deleted afterwards. Batched rows use 500
(``publish_many`` vs ``publish_async`` then awaiting the 500 acks; ours reads
with ``batch=500`` where raw uses ``fetch(500)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .. import ours
from ..case import Case, Metric
from ..env import Env
from ..measure import Handoff, Latency, Throughput, check_seq, clock, payload, transfer

SUBJECT = "raw.bench.events"
BATCH = ours.BATCH

_NEEDS_OURS = ("nats", "alkpubsub.transports.nats")
_NEEDS_DURABLE = ("nats", "alkpubsub.transports.nats_durable")


@contextlib.asynccontextmanager
async def _client(env: Env) -> AsyncIterator[Any]:
    import nats

    client = await nats.connect(env.nats_url(), allow_reconnect=False)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def _raw_stream(env: Env) -> AsyncIterator[tuple[Any, str]]:
    """A JetStream context on a new connection and a fresh stream's subject;
    the stream is deleted on exit."""
    from nats.js.api import StorageType, StreamConfig

    name = env.unique("RAW")
    subject = f"{name.lower()}.events"
    async with _client(env) as client:
        js = client.jetstream()
        await js.add_stream(
            StreamConfig(name=name, subjects=[f"{name.lower()}.>"], storage=StorageType.FILE)
        )
        try:
            yield js, subject
        finally:
            await js.delete_stream(name)


def _msg_id(run: str, i: int) -> dict[str, str]:
    # Raw publishes carry a Nats-Msg-Id like ours do: deduplicating retries is
    # part of the work (the header costs the client and the server something).
    return {"Nats-Msg-Id": f"{run}-{i}"}


async def _publish_async_batched(js: Any, subject: str, n: int) -> None:
    run = uuid.uuid4().hex
    for start in range(0, n, BATCH):
        futures = [
            await js.publish_async(
                subject, json.dumps(payload(i)).encode(), headers=_msg_id(run, i)
            )
            for i in range(start, min(start + BATCH, n))
        ]
        await asyncio.gather(*futures)


def cases(env: Env) -> list[Case]:
    """The NATS rows."""
    made: list[str] = []

    def url() -> str:
        return env.nats_url()

    def durable_url(read_batch: int | None = None) -> Callable[[], str]:
        def make() -> str:
            stream = env.unique("BENCH")
            made.append(stream)
            extra = f"&batch={read_batch}" if read_batch else ""
            return f"nats+durable://{url().split('://', 1)[1]}?stream={stream}{extra}"

        return make

    def dropping_streams(measure: Callable[[int], Awaitable[Any]]) -> Callable[[int], Any]:
        """Delete the JetStream streams ``measure`` made, so the server stays small."""

        async def run(n: int) -> Any:
            try:
                return await measure(n)
            finally:
                async with _client(env) as client:
                    js = client.jetstream()
                    for name in made:
                        with contextlib.suppress(Exception):
                            await js.delete_stream(name)
                made.clear()

        return run

    async def raw_core_transfer(n: int) -> Throughput:
        async with _client(env) as pub, _client(env) as sub:
            done = asyncio.get_running_loop().create_future()
            received = 0

            async def callback(msg: Any) -> None:
                nonlocal received
                check_seq(json.loads(msg.data), received)
                received += 1
                if received == n and not done.done():
                    done.set_result(None)

            await sub.subscribe(SUBJECT, cb=callback)
            await sub.flush()

            async def publish(n: int) -> None:
                for i in range(n):
                    await pub.publish(SUBJECT, json.dumps(payload(i)).encode())
                await pub.flush()

            async def receive(n: int) -> None:
                await done

            return await transfer(n, publish, receive)

    async def raw_core_latency(n: int) -> Latency:
        handoff = Handoff()
        async with _client(env) as pub, _client(env) as sub:

            async def callback(msg: Any) -> None:
                handoff.deliver(json.loads(msg.data))

            await sub.subscribe(SUBJECT, cb=callback)
            await sub.flush()

            async def publish(i: int) -> None:
                await pub.publish(SUBJECT, json.dumps(payload(i)).encode())

            return await handoff.round_trips(n, publish)

    async def raw_js_publish(n: int, *, batched: bool) -> Throughput:
        async with _raw_stream(env) as (js, subject):
            start = clock()
            if batched:
                await _publish_async_batched(js, subject, n)
            else:
                run = uuid.uuid4().hex
                for i in range(n):
                    await js.publish(
                        subject, json.dumps(payload(i)).encode(), headers=_msg_id(run, i)
                    )
            return Throughput(n, clock() - start)

    async def raw_js_fetch(n: int) -> Throughput:
        async with _raw_stream(env) as (js, subject):
            await _publish_async_batched(js, subject, n)
            psub = await js.pull_subscribe(subject, durable="bench")
            start = clock()
            seq = 0
            while seq < n:
                for msg in await psub.fetch(BATCH, timeout=5):
                    check_seq(json.loads(msg.data), seq)
                    seq += 1
                    await msg.ack()
            elapsed = clock() - start
            await psub.unsubscribe()
            return Throughput(n, elapsed)

    def case(
        name: str,
        metric: Metric,
        what: str,
        o: Callable[[int], Awaitable[Any]],
        r: Callable[[int], Awaitable[Any]],
        n: int,
        quick_n: int,
        needs: tuple[str, ...],
    ) -> Case:
        if needs == _NEEDS_DURABLE:
            o = dropping_streams(o)
        return Case(
            "nats", name, metric, what, o, r, n, quick_n,
            ours_needs=needs, raw_needs=("nats",), timeout=180,
        )  # fmt: skip

    return [
        case(
            "core publish->receive",
            "throughput",
            "nats:// publish each, another connection receives; "
            "raw: nc.publish each + subscribe(cb=...) callback",
            lambda n: ours.publish_receive(url, n),
            raw_core_transfer,
            100_000,
            2_000,
            _NEEDS_OURS,
        ),
        case(
            "core 1-in-flight latency",
            "latency",
            "publish one, the subscriber (task ours, callback raw) hands it back, repeat",
            lambda n: ours.latency(url, n),
            raw_core_latency,
            2_000,
            200,
            _NEEDS_OURS,
        ),
        case(
            "jetstream publish, serial",
            "throughput",
            "nats+durable:// publish awaited each (PubAck) vs js.publish each, both with a "
            "Nats-Msg-Id header; publish only",
            lambda n: ours.publish_only(durable_url(), n),
            lambda n: raw_js_publish(n, batched=False),
            10_000,
            300,
            _NEEDS_DURABLE,
        ),
        case(
            "jetstream publish, batches of 500",
            "throughput",
            "publish_many(500) vs 500 js.publish_async (with Nats-Msg-Id) then awaiting their "
            "acks; publish only",
            lambda n: ours.publish_only(durable_url(), n, batch=BATCH),
            lambda n: raw_js_publish(n, batched=True),
            50_000,
            1_000,
            _NEEDS_DURABLE,
        ),
        case(
            "jetstream pull + ack",
            "throughput",
            "a new durable consumer reads a backlog and acks each event "
            "(ours: batch=500; raw: pull_subscribe + fetch(500) + msg.ack() each)",
            lambda n: ours.consume_backlog(durable_url(BATCH), n, consumer="bench"),
            raw_js_fetch,
            50_000,
            1_000,
            _NEEDS_DURABLE,
        ),
        case(
            "jetstream 1-in-flight latency",
            "latency",
            "ours: publish one (PubAck), a durable consumer task receives, hands back, acks; "
            "raw: js.publish + a pull consumer fetch(1) loop",
            lambda n: ours.latency(durable_url(), n, consumer="bench"),
            raw_js_latency_factory(env),
            1_000,
            100,
            _NEEDS_DURABLE,
        ),
    ]


def raw_js_latency_factory(env: Env) -> Callable[[int], Awaitable[Latency]]:
    """Raw JetStream 1-in-flight: js.publish, a task fetching with a pull consumer."""

    async def measure(n: int) -> Latency:
        handoff = Handoff()
        async with _raw_stream(env) as (js, subject), _client(env) as sub_client:
            sub_js = sub_client.jetstream()
            psub = await sub_js.pull_subscribe(subject, durable="bench")

            async def consume() -> None:
                while True:
                    try:
                        msgs = await psub.fetch(BATCH, timeout=1)
                    except TimeoutError:
                        continue
                    for msg in msgs:
                        handoff.deliver(json.loads(msg.data))
                        await msg.ack()

            async def publish(i: int) -> None:
                await js.publish(subject, json.dumps(payload(i)).encode())

            task = asyncio.create_task(consume())
            try:
                return await handoff.round_trips(n, publish)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    return measure
