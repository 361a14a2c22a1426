"""Our side of the broker and Honker rows, the same for every transport URL.

Every function opens its own transports with ``alkpubsub.connect`` (outside
the clock), times the hot part, checks that every event arrived in order and
none was dropped, and closes. ``url`` is a callable returning a fresh URL
(a new file or stream name), so runs never see each other's events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .measure import BenchError, Handoff, Latency, Throughput, check_seq, clock, payload, transfer

TOPIC = "bench:events"
BATCH = 500
"""Events per ``publish_many`` call on batched rows (raw batches are the same size)."""

Url = Callable[[], str]


async def _connect(url: str) -> Any:
    import alkpubsub

    return await alkpubsub.connect(url)


async def _publish_serial(transport: Any, n: int, topic: str = TOPIC) -> None:
    publish = transport.publish
    for i in range(n):
        await publish(topic, payload(i))


async def _publish_batched(transport: Any, n: int, batch: int, topic: str = TOPIC) -> None:
    for start in range(0, n, batch):
        await transport.publish_many(
            [(topic, payload(i)) for i in range(start, min(start + batch, n))]
        )


async def publish_receive(
    url: Url, n: int, *, batch: int | None = None, consumer: str | None = None
) -> Throughput:
    """One transport publishes (awaited each, or ``publish_many`` of ``batch``),
    another receives (and acks, when ``consumer`` makes it durable)."""
    address = url()
    pub = await _connect(address)
    subt = await _connect(address)
    try:
        # Ephemeral buffers hold the whole run: a burst must not be dropped
        # (raw clients buffer without bound too). Durable ones pause instead.
        buffer = 1024 if consumer else max(1024, n)
        async with subt.subscribe(TOPIC, consumer=consumer, buffer=buffer) as sub:

            async def publish(n: int) -> None:
                if batch is None:
                    await _publish_serial(pub, n)
                else:
                    await _publish_batched(pub, n, batch)

            async def receive(n: int) -> None:
                for i in range(n):
                    event = await sub.__anext__()
                    check_seq(event.payload, i)
                    if consumer is not None:
                        await sub.ack(event)

            result = await transfer(n, publish, receive)
            if sub.stats.dropped:
                raise BenchError(f"subscriber dropped {sub.stats.dropped} events")
        return result
    finally:
        await subt.close()
        await pub.close()


async def publish_only(
    url: Url, n: int, *, batch: int | None = None, concurrency: int = 1
) -> Throughput:
    """Publish ``n`` events (no subscriber); the clock stops when the last
    publish returned (accepted: committed / acknowledged by the broker).

    ``concurrency`` tasks each publish their share, awaiting each publish."""
    transport = await _connect(url())
    try:
        start = clock()
        if batch is not None:
            await _publish_batched(transport, n, batch)
        elif concurrency == 1:
            await _publish_serial(transport, n)
        else:
            share = n // concurrency
            await asyncio.gather(*(_publish_serial(transport, share) for _ in range(concurrency)))
            n = share * concurrency
        return Throughput(n, clock() - start)
    finally:
        await transport.close()


async def consume_backlog(url: Url, n: int, *, consumer: str) -> Throughput:
    """``n`` events already in the durable log; time a new consumer (start
    "earliest") receiving and acking each of them."""
    address = url()
    transport = await _connect(address)
    try:
        await _publish_batched(transport, n, BATCH)
        async with transport.subscribe(TOPIC, consumer=consumer, start="earliest") as sub:
            start = clock()
            for i in range(n):
                event = await sub.__anext__()
                check_seq(event.payload, i)
                await sub.ack(event)
            return Throughput(n, clock() - start)
    finally:
        await transport.close()


async def latency(url: Url, n: int, *, consumer: str | None = None) -> Latency:
    """One transport publishes one event; a task on another transport receives
    it (acks it, when durable) and hands it back; repeat."""
    address = url()
    pub = await _connect(address)
    subt = await _connect(address)
    handoff = Handoff()
    try:
        async with subt.subscribe(TOPIC, consumer=consumer) as sub:

            async def consume() -> None:
                async for event in sub:
                    handoff.deliver(event.payload)
                    if consumer is not None:
                        await sub.ack(event)

            async def publish(i: int) -> None:
                await pub.publish(TOPIC, payload(i))

            task = asyncio.create_task(consume())
            try:
                return await handoff.round_trips(n, publish)
            finally:
                task.cancel()
    finally:
        await subt.close()
        await pub.close()
