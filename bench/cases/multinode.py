"""Multi-node rows: the composite's local path and the outbox relay to a broker.

Every row is a ratio to a baseline measured in the same run:

- composite ``["memory://", "honker+durable://<fresh file>"]`` publishing and
  receiving on the same composite (its local subscribers), next to
  ``memory://`` alone and ``honker+durable://`` alone doing the same;
- ``OutboxRelay`` draining pre-committed events from a Honker file to
  ``nats+durable://`` / ``redis+durable://``, next to the broker's own client
  writing the same count as fast as it can (nats-py ``js.publish_async`` with a
  ``Nats-Msg-Id`` header, acks awaited per 500; redis-py 500-``XADD``
  pipelines);
- a Honker commit reaching a named consumer on the broker through a running
  relay, next to a publish straight to the broker reaching the same consumer.

Brokers are this run's throwaway servers (``env.nats_url()``, ``env.redis_url()``);
every run uses a fresh file and a fresh stream, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .. import ours
from ..case import Case, Metric
from ..env import Env
from ..measure import BenchError, Handoff, Latency, Throughput, check_seq, clock, payload, transfer

TOPIC = ours.TOPIC
BATCH = ours.BATCH

_NEEDS_COMPOSITE = ("honker", "alkpubsub.transports.honker_durable", "alkpubsub.composite")
_NEEDS_RELAY = ("honker", "alkpubsub.transports.honker_durable", "alkpubsub.storage.outbox_relay")


async def _connect(url: str | list[str]) -> Any:
    import alkpubsub

    return await alkpubsub.connect(url)


# -- one transport publishing to its own subscribers ---------------------------


async def local_latency(url: str | list[str], n: int) -> Latency:
    """Publish one on a transport, a subscriber task on the same transport hands
    it back, repeat (a composite's local subscriber, or the leg alone)."""
    transport = await _connect(url)
    handoff = Handoff()
    try:
        async with transport.subscribe(TOPIC) as sub:

            async def consume() -> None:
                async for event in sub:
                    handoff.deliver(event.payload)

            async def publish(i: int) -> None:
                await transport.publish(TOPIC, payload(i))

            task = asyncio.create_task(consume())
            try:
                return await handoff.round_trips(n, publish)
            finally:
                task.cancel()
    finally:
        await transport.close()


async def local_transfer(url: str | list[str], n: int) -> Throughput:
    """``publish_many`` batches of 500 on a transport; a subscriber on the same
    transport takes all ``n`` in order."""
    transport = await _connect(url)
    try:
        async with transport.subscribe(TOPIC, buffer=max(1024, n)) as sub:

            async def publish(n: int) -> None:
                for start in range(0, n, BATCH):
                    batch = [(TOPIC, payload(i)) for i in range(start, min(start + BATCH, n))]
                    await transport.publish_many(batch)

            async def receive(n: int) -> None:
                for i in range(n):
                    check_seq((await sub.__anext__()).payload, i)

            result = await transfer(n, publish, receive)
            if sub.stats.dropped:
                raise BenchError(f"subscriber dropped {sub.stats.dropped} events")
            return result
    finally:
        await transport.close()


# -- brokers --------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    """What the relay rows need of one broker: fresh durable URLs, a count of
    what a stream holds, the raw client's fastest write, and clean-up."""

    name: str
    durable_needs: tuple[str, ...]
    raw_needs: tuple[str, ...]
    new_stream: Callable[[], tuple[str, str]]
    """A fresh (durable URL, stream name)."""
    count: Callable[[str], Awaitable[int]]
    """Messages the stream holds."""
    drop: Callable[[str], Awaitable[None]]
    raw_write: Callable[[int], Awaitable[Throughput]]
    """The raw client writing ``n`` messages to a fresh stream, timed."""


def wire_bytes(n: int) -> list[bytes]:
    """The bytes the relay puts on the broker for events ``0..n-1`` (each one's
    envelope), so the raw client sends the same bytes it is compared with."""
    from alkpubsub import Event

    made = (Event.create(TOPIC, payload(i), origin="bench") for i in range(n))
    return [event.envelope(body) for event, body in made]


def nats_broker(env: Env) -> Broker:
    @contextlib.asynccontextmanager
    async def jetstream() -> AsyncIterator[Any]:
        import nats

        client = await nats.connect(env.nats_url(), allow_reconnect=False)
        try:
            yield client.jetstream()
        finally:
            await client.close()

    def new_stream() -> tuple[str, str]:
        stream = env.unique("MULTI")
        return f"nats+durable://{env.nats_url().split('://', 1)[1]}?stream={stream}", stream

    async def count(stream: str) -> int:
        async with jetstream() as js:
            info = await js.stream_info(stream)
            return int(info.state.messages)

    async def drop(stream: str) -> None:
        async with jetstream() as js:
            with contextlib.suppress(Exception):
                await js.delete_stream(stream)

    async def raw_write(n: int) -> Throughput:
        from nats.js.api import StorageType, StreamConfig

        stream = env.unique("RAWMULTI")
        subject = f"{stream.lower()}.events"
        run = uuid.uuid4().hex
        envelopes = wire_bytes(n)
        async with jetstream() as js:
            config = StreamConfig(
                name=stream, subjects=[f"{stream.lower()}.>"], storage=StorageType.FILE
            )
            await js.add_stream(config)
            try:
                start = clock()
                for first in range(0, n, BATCH):
                    acks = [
                        await js.publish_async(
                            subject, envelopes[i], headers={"Nats-Msg-Id": f"{run}-{i}"}
                        )
                        for i in range(first, min(first + BATCH, n))
                    ]
                    await asyncio.gather(*acks)
                elapsed = clock() - start
                stored = int((await js.stream_info(stream)).state.messages)
            finally:
                await js.delete_stream(stream)
        if stored != n:
            raise BenchError(f"raw JetStream stream holds {stored} of {n} messages")
        return Throughput(n, elapsed)

    return Broker(
        "nats",
        ("nats", "alkpubsub.transports.nats_durable"),
        ("nats",),
        new_stream,
        count,
        drop,
        raw_write,
    )


def redis_broker(env: Env) -> Broker:
    @contextlib.asynccontextmanager
    async def client() -> AsyncIterator[Any]:
        import redis.asyncio as aioredis

        redis = aioredis.from_url(env.redis_url())
        try:
            yield redis
        finally:
            await redis.aclose()

    def new_stream() -> tuple[str, str]:
        stream = env.unique("multi")
        return f"redis+durable://{env.redis_url().split('://', 1)[1]}?stream={stream}", stream

    async def count(stream: str) -> int:
        async with client() as redis:
            return int(await redis.xlen(stream))

    async def drop(stream: str) -> None:
        async with client() as redis:
            await redis.delete(stream)

    async def raw_write(n: int) -> Throughput:
        stream = env.unique("rawmulti")
        envelopes = wire_bytes(n)
        async with client() as redis:
            start = clock()
            for first in range(0, n, BATCH):
                async with redis.pipeline(transaction=False) as pipe:
                    for i in range(first, min(first + BATCH, n)):
                        fields = {"topic": TOPIC, "event": envelopes[i]}
                        pipe.xadd(stream, fields, maxlen=1_000_000, approximate=True)
                    await pipe.execute()
            elapsed = clock() - start
            stored = int(await redis.xlen(stream))
            await redis.delete(stream)
        if stored != n:
            raise BenchError(f"raw Redis stream holds {stored} of {n} entries")
        return Throughput(n, elapsed)

    return Broker(
        "redis",
        ("redis", "alkpubsub.transports.redis_durable"),
        ("redis",),
        new_stream,
        count,
        drop,
        raw_write,
    )


# -- the relay --------------------------------------------------------------------


async def relay_drain(env: Env, broker: Broker, n: int) -> Throughput:
    """``n`` events already committed in a Honker file; time an OutboxRelay
    forwarding all of them to a fresh broker stream (confirmed by the broker,
    acked at the source), then check the stream holds exactly ``n``."""
    from alkpubsub.storage.outbox_relay import OutboxRelay

    source_url = f"honker+durable://{env.path('relay')}"
    target_url, stream = broker.new_stream()
    source = await _connect(source_url)
    target = await _connect(target_url)
    try:
        for first in range(0, n, BATCH):
            await source.publish_many(
                [(TOPIC, payload(i)) for i in range(first, min(first + BATCH, n))]
            )
        relay = OutboxRelay(source, target, consumer="bench-relay")
        start = clock()
        await relay.run(limit=n)
        elapsed = clock() - start
        stored = await broker.count(stream)
        if stored != n:
            raise BenchError(f"the relay left {stored} of {n} events in the {broker.name} stream")
        return Throughput(n, elapsed)
    finally:
        await target.close()
        await source.close()
        await broker.drop(stream)


async def relay_latency(env: Env, broker: Broker, n: int, *, via_relay: bool) -> Latency:
    """1-in-flight to a named consumer on the broker. ``via_relay``: publish on
    ``honker+durable://`` (one commit) and a running OutboxRelay carries it;
    otherwise publish straight to the broker's durable URL."""
    from alkpubsub.storage.outbox_relay import OutboxRelay

    target_url, stream = broker.new_stream()
    source_url = f"honker+durable://{env.path('e2e')}"
    reader = await _connect(target_url)
    publisher = await _connect(source_url if via_relay else target_url)
    opened = [publisher, reader]
    stop = asyncio.Event()
    relaying: asyncio.Task[None] | None = None
    handoff = Handoff()
    try:
        async with reader.subscribe(TOPIC, consumer="bench") as sub:
            if via_relay:
                relay_source = await _connect(source_url)
                opened.append(relay_source)
                relay_target = await _connect(target_url)
                opened.append(relay_target)
                relay = OutboxRelay(relay_source, relay_target, consumer="bench-relay")
                relaying = asyncio.create_task(relay.run(stop=stop))

            async def consume() -> None:
                async for event in sub:
                    handoff.deliver(event.payload)
                    await sub.ack(event)

            async def publish(i: int) -> None:
                await publisher.publish(TOPIC, payload(i))

            task = asyncio.create_task(consume())
            try:
                return await handoff.round_trips(n, publish)
            finally:
                task.cancel()
                stop.set()
                if relaying is not None:
                    await asyncio.wait_for(relaying, 10)
    finally:
        for transport in opened:
            await transport.close()
        await broker.drop(stream)


# -- the rows --------------------------------------------------------------------


def cases(env: Env) -> list[Case]:
    """The multi-node rows."""

    def composite() -> list[str]:
        return ["memory://", f"honker+durable://{env.path('composite')}"]

    def honker() -> str:
        return f"honker+durable://{env.path('leg')}"

    def case(
        name: str,
        metric: Metric,
        what: str,
        o: Callable[[int], Awaitable[Any]],
        r: Callable[[int], Awaitable[Any]],
        n: int,
        quick_n: int,
        *,
        baseline: str,
        ours_needs: tuple[str, ...],
        raw_needs: tuple[str, ...],
    ) -> Case:
        return Case(
            "multinode", name, metric, what, o, r, n, quick_n, baseline=baseline,
            ours_needs=ours_needs, raw_needs=raw_needs, timeout=180,
        )  # fmt: skip

    rows = [
        case(
            "composite local latency vs memory",
            "latency",
            'composite ["memory://", "honker+durable://"]: publish one, a subscriber on the '
            "same composite hands it back (publish commits to Honker first), repeat; "
            "baseline: the same on memory:// alone",
            lambda n: local_latency(composite(), n),
            lambda n: local_latency("memory://", n),
            2_000,
            100,
            baseline="memory://",
            ours_needs=_NEEDS_COMPOSITE,
            raw_needs=(),
        ),
        case(
            "composite local latency vs honker+durable",
            "latency",
            "as above; baseline: publish and a live subscriber on one honker+durable:// "
            "transport alone",
            lambda n: local_latency(composite(), n),
            lambda n: local_latency(honker(), n),
            2_000,
            100,
            baseline="honker+durable",
            ours_needs=_NEEDS_COMPOSITE,
            raw_needs=_NEEDS_COMPOSITE[:2],
        ),
        case(
            "composite publish_many(500)->receive",
            "throughput",
            "publish_many(500) on the composite, a subscriber on the same composite takes "
            "every event; baseline: the same on honker+durable:// alone",
            lambda n: local_transfer(composite(), n),
            lambda n: local_transfer(honker(), n),
            20_000,
            1_000,
            baseline="honker+durable",
            ours_needs=_NEEDS_COMPOSITE,
            raw_needs=_NEEDS_COMPOSITE[:2],
        ),
    ]

    def relay_rows(broker: Broker) -> list[Case]:
        raw_client = (
            "js.publish_async with Nats-Msg-Id, acks awaited per 500"
            if broker.name == "nats"
            else "500-XADD pipelines"
        )
        return [
            case(
                f"relay drain to {broker.name}+durable",
                "throughput",
                f"OutboxRelay (its default batch) forwards n events already committed in a "
                f"Honker file to a fresh {broker.name}+durable stream, confirmed and acked; "
                f"baseline: the raw client writing n small JSON messages ({raw_client})",
                lambda n: relay_drain(env, broker, n),
                broker.raw_write,
                10_000,
                500,
                baseline=f"raw {broker.name}",
                ours_needs=_NEEDS_RELAY + broker.durable_needs,
                raw_needs=broker.raw_needs,
            ),
            case(
                f"commit->relay->{broker.name} consumer latency",
                "latency",
                f"publish one on honker+durable:// (a commit), a running OutboxRelay forwards "
                f"it, a named consumer on {broker.name}+durable hands it back and acks; "
                f"baseline: publish straight to {broker.name}+durable, same consumer",
                lambda n: relay_latency(env, broker, n, via_relay=True),
                lambda n: relay_latency(env, broker, n, via_relay=False),
                1_000,
                100,
                baseline=f"direct {broker.name}",
                ours_needs=_NEEDS_RELAY + broker.durable_needs,
                raw_needs=broker.durable_needs,
            ),
        ]

    return rows + relay_rows(nats_broker(env)) + relay_rows(redis_broker(env))
