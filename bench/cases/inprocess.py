"""In-process rows: ``memory://`` next to an ``asyncio.Queue`` fan-out with ``json``.

The raw baseline does what the in-process transport does, minus the library:
serialise the payload (``json.dumps``), look up the topic's queues, put, and
the subscriber decodes (``json.loads``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from ..case import Case, Target
from ..env import Env
from ..measure import BenchError, Handoff, Latency, Throughput, check_seq, payload, transfer

TOPIC = "bench:events"
YIELD_EVERY = 64
"""The publisher yields to the loop every this many events (both sides), as a
real producer does at its own awaits; the subscriber then drains its buffer."""


class RawBus:
    """The raw baseline: topic -> subscriber queues, JSON text in between."""

    def __init__(self) -> None:
        self.queues: dict[str, list[asyncio.Queue[tuple[str, str]]]] = {}

    def subscribe(self, topic: str) -> asyncio.Queue[tuple[str, str]]:
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.queues.setdefault(topic, []).append(queue)
        return queue

    def publish(self, topic: str, value: object) -> None:
        body = json.dumps(value)
        for queue in self.queues.get(topic, ()):
            queue.put_nowait((topic, body))


@contextlib.asynccontextmanager
async def _memory_pair(env: Env) -> AsyncIterator[tuple[object, object]]:
    """A publisher and a subscriber transport on one named in-process bus."""
    import alkpubsub

    url = f"memory://{env.unique('bench')}"
    pub = await alkpubsub.connect(url)
    sub = await alkpubsub.connect(url)
    try:
        yield pub, sub
    finally:
        await sub.close()
        await pub.close()


def _publisher(
    publish: Callable[[str, object], Awaitable[object] | None],
) -> Callable[[int], Awaitable[None]]:
    async def run(n: int) -> None:
        for i in range(n):
            result = publish(TOPIC, payload(i))
            if result is not None:
                await result
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)

    return run


def cases(env: Env) -> list[Case]:
    """The in-process rows."""

    async def ours_throughput(n: int) -> Throughput:
        from alkpubsub import Transport

        async with _memory_pair(env) as (pub, subt):
            assert isinstance(pub, Transport) and isinstance(subt, Transport)
            async with subt.subscribe(TOPIC) as sub:

                async def receive(n: int) -> None:
                    for i in range(n):
                        event = await sub.__anext__()
                        check_seq(event.payload, i)

                result = await transfer(n, _publisher(pub.publish), receive)
                if sub.stats.dropped:
                    raise BenchError(f"subscriber dropped {sub.stats.dropped} events")
        return result

    async def raw_throughput(n: int) -> Throughput:
        bus = RawBus()
        queue = bus.subscribe(TOPIC)

        async def receive(n: int) -> None:
            for i in range(n):
                _topic, body = await queue.get()
                check_seq(json.loads(body), i)

        return await transfer(n, _publisher(bus.publish), receive)

    async def ours_latency(n: int) -> Latency:
        from alkpubsub import Transport

        handoff = Handoff()
        async with _memory_pair(env) as (pub, subt):
            assert isinstance(pub, Transport) and isinstance(subt, Transport)
            async with subt.subscribe(TOPIC) as sub:

                async def consume() -> None:
                    async for event in sub:
                        handoff.deliver(event.payload)

                async def publish(i: int) -> None:
                    await pub.publish(TOPIC, payload(i))

                consumer = asyncio.create_task(consume())
                try:
                    return await handoff.round_trips(n, publish)
                finally:
                    consumer.cancel()

    async def raw_latency(n: int) -> Latency:
        bus = RawBus()
        queue = bus.subscribe(TOPIC)
        handoff = Handoff()

        async def consume() -> None:
            while True:
                _topic, body = await queue.get()
                handoff.deliver(json.loads(body))

        async def publish(i: int) -> None:
            bus.publish(TOPIC, payload(i))

        consumer = asyncio.create_task(consume())
        try:
            return await handoff.round_trips(n, publish)
        finally:
            consumer.cancel()

    return [
        Case(
            transport="inprocess",
            name="publish->receive",
            metric="throughput",
            what="one publisher task, one subscriber task, small dict payload; "
            "raw: asyncio.Queue fan-out with json.dumps/json.loads",
            ours=ours_throughput,
            raw=raw_throughput,
            n=100_000,
            quick_n=5_000,
            target=Target("ratio_min", 0.8),
        ),
        Case(
            transport="inprocess",
            name="1-in-flight latency",
            metric="latency",
            what="publish one, a subscriber task receives it and hands it back, repeat",
            ours=ours_latency,
            raw=raw_latency,
            n=5_000,
            quick_n=500,
            target=Target("p50_max_us", 50),
            timeout=120,
        ),
    ]
