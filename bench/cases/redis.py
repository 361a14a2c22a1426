"""Redis rows: ``redis://`` and ``redis+durable://`` next to redis-py (asyncio) used directly.

The raw side sends ``json.dumps(payload)`` and decodes with ``json.loads``;
ours sends the event envelope. Batched rows use batches of 500 on both sides
(pipelines raw, ``publish_many`` ours); ours reads with ``batch=500`` where raw
uses ``XREADGROUP COUNT 500``. Every run uses a fresh stream key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .. import ours
from ..case import Case, Metric
from ..env import Env
from ..measure import (
    BenchError,
    Handoff,
    Latency,
    Throughput,
    check_seq,
    clock,
    payload,
    transfer,
)

CHANNEL = "bench:raw"
BATCH = ours.BATCH
MAXLEN = 1_000_000
"""Approximate stream cap, the same as redis+durable's default ``maxlen``."""

_NEEDS_OURS = ("redis", "alkpubsub.transports.redis")
_NEEDS_DURABLE = ("redis", "alkpubsub.transports.redis_durable")


@contextlib.asynccontextmanager
async def _client(env: Env) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(env.redis_url())
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _subscribed(env: Env) -> AsyncIterator[tuple[Any, Any]]:
    """A publishing client and a pub/sub subscribed (and confirmed) to CHANNEL."""
    async with _client(env) as pub, _client(env) as sub:
        pubsub = sub.pubsub()
        await pubsub.subscribe(CHANNEL)
        reply = await pubsub.get_message(timeout=5)
        if not reply or reply.get("type") != "subscribe":
            raise BenchError(f"no subscribe confirmation from redis: {reply!r}")
        try:
            yield pub, pubsub
        finally:
            await pubsub.aclose()


async def _receive_pubsub(pubsub: Any, n: int, deliver: Callable[[object], None]) -> None:
    got = 0
    while got < n:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
        if message is not None:
            deliver(json.loads(message["data"]))
            got += 1


def cases(env: Env) -> list[Case]:
    """The Redis rows."""

    def url() -> str:
        return env.redis_url()

    made: list[str] = []

    def durable_url(read_batch: int | None = None) -> Callable[[], str]:
        def make() -> str:
            stream = env.unique("bench")
            made.append(stream)
            extra = f"&batch={read_batch}" if read_batch else ""
            return f"redis+durable://{url().split('://', 1)[1]}?stream={stream}{extra}"

        return make

    def dropping_streams(measure: Callable[[int], Awaitable[Any]]) -> Callable[[int], Any]:
        """Delete the streams ``measure`` made, so the server stays small."""

        async def run(n: int) -> Any:
            try:
                return await measure(n)
            finally:
                if made:
                    async with _client(env) as client:
                        await client.delete(*made)
                    made.clear()

        return run

    async def raw_pubsub_transfer(n: int, *, pipelined: bool) -> Throughput:
        async with _subscribed(env) as (pub, pubsub):
            expected = iter(range(n))

            async def receive(n: int) -> None:
                await _receive_pubsub(pubsub, n, lambda p: check_seq(p, next(expected)))

            async def publish(n: int) -> None:
                if not pipelined:
                    for i in range(n):
                        await pub.publish(CHANNEL, json.dumps(payload(i)))
                    return
                for start in range(0, n, BATCH):
                    async with pub.pipeline(transaction=False) as pipe:
                        for i in range(start, min(start + BATCH, n)):
                            pipe.publish(CHANNEL, json.dumps(payload(i)))
                        await pipe.execute()

            return await transfer(n, publish, receive)

    async def raw_pubsub_latency(n: int) -> Latency:
        handoff = Handoff()
        async with _subscribed(env) as (pub, pubsub):
            task = asyncio.create_task(_receive_pubsub(pubsub, 1 << 62, handoff.deliver))

            async def publish(i: int) -> None:
                await pub.publish(CHANNEL, json.dumps(payload(i)))

            try:
                return await handoff.round_trips(n, publish)
            finally:
                task.cancel()

    async def raw_xadd(n: int) -> Throughput:
        stream = env.unique("raw")
        async with _client(env) as client:
            start = clock()
            await _xadd_batched(client, stream, n)
            elapsed = clock() - start
            await client.delete(stream)
        return Throughput(n, elapsed)

    async def raw_xreadgroup(n: int) -> Throughput:
        stream = env.unique("raw")
        async with _client(env) as client:
            await _xadd_batched(client, stream, n)
            await client.xgroup_create(stream, "bench", id="0")
            start = clock()
            seq = 0
            while seq < n:
                reply = await client.xreadgroup("bench", "c1", {stream: ">"}, count=BATCH)
                ids = []
                for _key, entries in reply:
                    for entry_id, fields in entries:
                        check_seq(json.loads(fields[b"event"]), seq)
                        seq += 1
                        ids.append(entry_id)
                await client.xack(stream, "bench", *ids)
            elapsed = clock() - start
            await client.delete(stream)
        return Throughput(n, elapsed)

    async def raw_stream_latency(n: int) -> Latency:
        stream = env.unique("raw")
        handoff = Handoff()
        running = True
        async with _client(env) as pub, _client(env) as sub:
            await sub.xgroup_create(stream, "bench", id="$", mkstream=True)

            async def consume() -> None:
                # A flag, not only cancel(): redis-py's retry loop can swallow a
                # cancellation that lands inside a blocking XREADGROUP.
                while running:
                    reply = await sub.xreadgroup(
                        "bench", "c1", {stream: ">"}, count=BATCH, block=100
                    )
                    for _key, entries in reply or ():
                        for entry_id, fields in entries:
                            handoff.deliver(json.loads(fields[b"event"]))
                            await sub.xack(stream, "bench", entry_id)

            async def publish(i: int) -> None:
                fields = {"topic": CHANNEL, "event": json.dumps(payload(i))}
                await pub.xadd(stream, fields, maxlen=MAXLEN, approximate=True)

            task = asyncio.create_task(consume())
            try:
                return await handoff.round_trips(n, publish)
            finally:
                running = False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, timeout=2)
                await pub.delete(stream)

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
            "redis", name, metric, what, o, r, n, quick_n,
            ours_needs=needs, raw_needs=("redis",), timeout=180,
        )  # fmt: skip

    return [
        case(
            "publish->receive, awaited each",
            "throughput",
            "redis:// publish awaited one by one, another connection receives; "
            "raw: PUBLISH each + PubSub.get_message",
            lambda n: ours.publish_receive(url, n),
            lambda n: raw_pubsub_transfer(n, pipelined=False),
            10_000,
            300,
            _NEEDS_OURS,
        ),
        case(
            "publish->receive, batches of 500",
            "throughput",
            "publish_many(500) vs a 500-PUBLISH pipeline, another connection receives",
            lambda n: ours.publish_receive(url, n, batch=BATCH),
            lambda n: raw_pubsub_transfer(n, pipelined=True),
            50_000,
            1_000,
            _NEEDS_OURS,
        ),
        case(
            "1-in-flight latency",
            "latency",
            "publish one, a subscriber task on another connection receives it, repeat",
            lambda n: ours.latency(url, n),
            raw_pubsub_latency,
            2_000,
            200,
            _NEEDS_OURS,
        ),
        case(
            "streams: XADD, batches of 500",
            "throughput",
            "redis+durable:// publish_many(500) vs a 500-XADD pipeline (MAXLEN ~1e6); "
            "publish only, until the last reply",
            lambda n: ours.publish_only(durable_url(), n, batch=BATCH),
            raw_xadd,
            50_000,
            1_000,
            _NEEDS_DURABLE,
        ),
        case(
            "streams: XREADGROUP+XACK",
            "throughput",
            "a new consumer group reads a backlog and acks every event "
            "(ours: batch=500, ack each; raw: XREADGROUP COUNT 500 + one XACK per batch)",
            lambda n: ours.consume_backlog(durable_url(BATCH), n, consumer="bench"),
            raw_xreadgroup,
            50_000,
            1_000,
            _NEEDS_DURABLE,
        ),
        case(
            "streams: 1-in-flight latency",
            "latency",
            "XADD one; a consumer-group reader task receives, hands back, acks; repeat",
            lambda n: ours.latency(durable_url(), n, consumer="bench"),
            raw_stream_latency,
            1_000,
            100,
            _NEEDS_DURABLE,
        ),
    ]


async def _xadd_batched(client: Any, stream: str, n: int) -> None:
    for start in range(0, n, BATCH):
        async with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + BATCH, n)):
                fields = {"topic": CHANNEL, "event": json.dumps(payload(i))}
                pipe.xadd(stream, fields, maxlen=MAXLEN, approximate=True)
            await pipe.execute()
