"""Hub/spoke rows: a ``ws://`` spoke and an ``alkpubsub.hub.Hub`` (under uvicorn,
``websockets-sansio``, ``memory://`` backend) next to a raw ``websockets``
echo of the same JSON frame bytes, in the same run.

Everything runs in this process's event loop, both sides alike: ours is the
hub (uvicorn) and the spoke (a ``ws://`` transport) on loopback; raw is a
``websockets`` server that echoes every message and a ``websockets`` client.

- **spoke publish -> hub subscriber**: the spoke publishes (``publish``
  awaited, 64 in flight from 64 tasks, or one at a time), a subscriber on the
  hub's own tenant transport (``hub.transport_for``) receives;
- **hub publish -> spoke subscriber**: code on the hub publishes on the
  tenant's transport (64 events in flight: published but not yet received, or
  one), a ``ws://`` subscription receives.

Raw: the client sends the frame ours would send (``{"op":"publish","id":i}``
or ``{"op":"event",...}``, a newline, the event envelope; built with
``json.dumps``), the server echoes it, the client decodes it (``json.loads``)
and checks its ``seq``; 64 frames in flight, or one. So raw crosses the wire
twice per event where ours crosses once plus a small reply (``published``, or
credit every 256 events): raw is the floor of what one WebSocket costs here.
Targets (the hub issue): throughput >= 0.5x raw; p50 <= raw + 150 us (shown
in the delta column; the bench has no target kind for a delta).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..case import Case, Metric, Target
from ..env import Env
from ..measure import BenchError, Handoff, Latency, Throughput, check_seq, payload, transfer

HOST = "127.0.0.1"
TOPIC = "bench:events"
TENANT = "bench"
IN_FLIGHT = 64
"""Events in flight on the throughput rows (both sides)."""

_NEEDS = ("uvicorn", "websockets", "alkpubsub.hub", "alkpubsub.transports.ws")
_NEEDS_RAW = ("websockets",)
_TOKEN = "bench-token-0123456789abcdef"


@contextlib.asynccontextmanager
async def _hub(env: Env) -> AsyncIterator[tuple[Any, str]]:
    """A hub under uvicorn on a free loopback port: (hub, spoke URL)."""
    import uvicorn

    from alkpubsub.hub import Grant, Hub, tokens

    hub = Hub(f"memory://{env.unique('hub')}-{{tenant}}", auth=tokens({_TOKEN: Grant(TENANT)}))
    config = uvicorn.Config(
        hub, host=HOST, port=0, ws="websockets-sansio", lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if serving.done():
                    await serving
                    raise BenchError("uvicorn did not start")
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield hub, f"ws://{HOST}:{port}/events?token={_TOKEN}"
    finally:
        await hub.close()
        server.should_exit = True
        async with asyncio.timeout(10):
            await serving


@contextlib.asynccontextmanager
async def _spoke(env: Env) -> AsyncIterator[tuple[Any, Any, Any]]:
    """(hub, the tenant's transport on the hub, a connected spoke)."""
    import alkpubsub

    async with _hub(env) as (hub, url):
        tenant = await hub.transport_for(TENANT)
        spoke = await alkpubsub.connect(url)
        try:
            yield hub, tenant, spoke
        finally:
            await spoke.close()


# -- ours -----------------------------------------------------------------------


async def spoke_to_hub_throughput(env: Env, n: int) -> Throughput:
    async with (
        _spoke(env) as (_, tenant, spoke),
        tenant.subscribe(TOPIC, buffer=max(1024, n)) as sub,
    ):
        seqs = iter(range(n))

        async def publisher() -> None:
            publish = spoke.publish
            for i in seqs:
                await publish(TOPIC, payload(i))

        async def publish(n: int) -> None:
            await asyncio.gather(*(publisher() for _ in range(IN_FLIGHT)))

        async def receive(n: int) -> None:
            seen = bytearray(n)
            for _ in range(n):
                event = await sub.__anext__()
                seq = event.payload["seq"]
                if seen[seq]:
                    raise BenchError(f"seq={seq} received twice")
                seen[seq] = 1

        result = await transfer(n, publish, receive)
        if sub.stats.dropped:
            raise BenchError(f"the hub-side subscriber dropped {sub.stats.dropped} events")
        return result


async def spoke_to_hub_latency(env: Env, n: int) -> Latency:
    async with _spoke(env) as (_, tenant, spoke):
        handoff = Handoff()
        async with tenant.subscribe(TOPIC) as sub:

            async def consume() -> None:
                async for event in sub:
                    handoff.deliver(event.payload)

            async def publish(i: int) -> None:
                await spoke.publish(TOPIC, payload(i))

            task = asyncio.create_task(consume())
            try:
                return await handoff.round_trips(n, publish)
            finally:
                task.cancel()


async def hub_to_spoke_throughput(env: Env, n: int) -> Throughput:
    async with _spoke(env) as (_, tenant, spoke), spoke.subscribe(TOPIC, buffer=1024) as sub:
        received = 0
        room = asyncio.Event()

        async def publish(n: int) -> None:
            for i in range(n):
                while i - received >= IN_FLIGHT:
                    room.clear()
                    await room.wait()
                await tenant.publish(TOPIC, payload(i))

        async def receive(n: int) -> None:
            nonlocal received
            for i in range(n):
                event = await sub.__anext__()
                check_seq(event.payload, i)
                received += 1
                room.set()

        result = await transfer(n, publish, receive)
        if sub.stats.dropped:
            raise BenchError(f"the spoke's subscription dropped {sub.stats.dropped} events")
        return result


async def hub_to_spoke_latency(env: Env, n: int) -> Latency:
    async with _spoke(env) as (_, tenant, spoke):
        handoff = Handoff()
        async with spoke.subscribe(TOPIC) as sub:

            async def consume() -> None:
                async for event in sub:
                    handoff.deliver(event.payload)

            async def publish(i: int) -> None:
                await tenant.publish(TOPIC, payload(i))

            task = asyncio.create_task(consume())
            try:
                return await handoff.round_trips(n, publish)
            finally:
                task.cancel()


# -- raw: a websockets echo of the same frame bytes ---------------------------------

_ENVELOPE = {
    "alkpubsub": 1,
    "id": "01a2325e-81ed-735b-8187-2956053d5070",
    "topic": TOPIC,
    "headers": {},
    "published_at": "2026-12-01T16:09:44.173215Z",
    "origin": "15420-320af8e4f6ee",
}


def raw_frame(header: dict[str, Any], i: int) -> bytes:
    """The frame ours sends, built with ``json.dumps``: header, newline, envelope."""
    compact = (",", ":")
    head = json.dumps(header, separators=compact)
    body = json.dumps({**_ENVELOPE, "payload": payload(i)}, separators=compact)
    return f"{head}\n{body}".encode()


def raw_read(frame: bytes) -> object:
    """Decode an echoed frame as ours does (header and envelope); the payload."""
    head, _, body = frame.partition(b"\n")
    json.loads(head)
    return json.loads(body)["payload"]


@contextlib.asynccontextmanager
async def _echo() -> AsyncIterator[Any]:
    """A raw websockets server echoing every message, and a client connected to it."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    async def echo(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, HOST, 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://{HOST}:{port}", compression=None) as client:
            yield client


def _header(kind: str, i: int) -> dict[str, Any]:
    if kind == "publish":
        return {"op": "publish", "id": i}
    return {"op": "event", "sub": "s1", "offset": None, "dropped": 0}


async def raw_throughput(kind: str, n: int) -> Throughput:
    async with _echo() as client:
        window = asyncio.Semaphore(IN_FLIGHT)

        async def publish(n: int) -> None:
            send = client.send
            for i in range(n):
                await window.acquire()
                await send(raw_frame(_header(kind, i), i))

        async def receive(n: int) -> None:
            for i in range(n):
                check_seq(raw_read(await client.recv()), i)
                window.release()

        return await transfer(n, publish, receive)


async def raw_latency(kind: str, n: int) -> Latency:
    async with _echo() as client:
        handoff = Handoff()

        async def consume() -> None:
            async for frame in client:
                handoff.deliver(raw_read(frame))

        async def publish(i: int) -> None:
            await client.send(raw_frame(_header(kind, i), i))

        task = asyncio.create_task(consume())
        try:
            return await handoff.round_trips(n, publish)
        finally:
            task.cancel()


def cases(env: Env) -> list[Case]:
    """The hub/spoke rows."""

    def case(
        name: str,
        metric: Metric,
        what: str,
        o: Callable[[Env, int], Awaitable[Any]],
        kind: str,
        n: int,
        quick_n: int,
    ) -> Case:
        def ours(n: int) -> Awaitable[Any]:
            return o(env, n)

        if metric == "throughput":

            def raw(n: int) -> Awaitable[Any]:
                return raw_throughput(kind, n)

            target = Target("ratio_min", 0.5)
        else:

            def raw(n: int) -> Awaitable[Any]:
                return raw_latency(kind, n)

            target = None  # p50 <= raw + 150 us: read the delta column
        return Case(
            "hub", name, metric, what, ours, raw, n, quick_n,
            baseline="raw ws echo", ours_needs=_NEEDS, raw_needs=_NEEDS_RAW,
            target=target, timeout=180,
        )  # fmt: skip

    return [
        case(
            "spoke publish->hub subscriber, 64 in flight",
            "throughput",
            "ws:// spoke publish awaited by 64 tasks, a subscriber on hub.transport_for() "
            "receives (memory:// backend); raw: websockets echo, 64 frames in flight",
            spoke_to_hub_throughput,
            "publish",
            20_000,
            1_000,
        ),
        case(
            "spoke publish->hub subscriber, 1-in-flight latency",
            "latency",
            "spoke publish (until 'published'), a hub-side subscriber task hands it back; "
            "raw: one echo; target p50 <= raw + 150 us",
            spoke_to_hub_latency,
            "publish",
            2_000,
            200,
        ),
        case(
            "hub publish->spoke subscriber, 64 in flight",
            "throughput",
            "publish on hub.transport_for() (memory://), 64 not yet received, a ws:// "
            "subscription receives; raw: websockets echo, 64 frames in flight",
            hub_to_spoke_throughput,
            "event",
            20_000,
            1_000,
        ),
        case(
            "hub publish->spoke subscriber, 1-in-flight latency",
            "latency",
            "publish on the hub's tenant transport, a spoke subscriber task hands it back; "
            "raw: one echo; target p50 <= raw + 150 us",
            hub_to_spoke_latency,
            "event",
            2_000,
            200,
        ),
    ]
