"""Child processes for the cross-process Honker rows.

``python -m bench.child publish-ours URL TOPIC``
``python -m bench.child publish-raw PATH CHANNEL``
    Print ``ready``, then for each line ``<seq>`` on stdin publish one event
    whose payload carries ``seq`` and ``t`` (``time.perf_counter()`` just
    before the publish call; CLOCK_MONOTONIC, so the parent can subtract it
    from its own clock). Exit at end of input.

``python -m bench.child idle-ours URL COUNT SECONDS``
``python -m bench.child idle-raw PATH COUNT SECONDS``
    Open COUNT live subscriptions (ours) or listeners (raw honker) on distinct
    topics, settle, then print ``{"cpu": s, "wall": s}``: the CPU time the
    whole process (every thread) used while idle for SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

from .measure import payload


def _stamped(seq: int) -> dict[str, object]:
    value = payload(seq)
    value["t"] = time.perf_counter()
    return value


async def publish_ours(url: str, topic: str) -> None:
    import alkpubsub

    transport = await alkpubsub.connect(url)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    try:
        while line := await reader.readline():
            await transport.publish(topic, _stamped(int(line)))
    finally:
        await transport.close()


def publish_raw(path: str, channel: str) -> None:
    import honker

    db = honker.open(path)
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            with db.transaction() as tx:
                tx.notify(channel, _stamped(int(line)))
    finally:
        db.close()


async def _idle(seconds: float) -> None:
    await asyncio.sleep(0.5)  # let every reader reach its wait
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(json.dumps({"cpu": cpu, "wall": wall}), flush=True)


async def idle_ours(url: str, count: int, seconds: float) -> None:
    import alkpubsub

    transport = await alkpubsub.connect(url)
    async with contextlib.AsyncExitStack() as stack:
        for i in range(count):
            await stack.enter_async_context(transport.subscribe(f"bench:idle{i}"))
        await _idle(seconds)
    await transport.close()


async def idle_raw(path: str, count: int, seconds: float) -> None:
    import honker

    db = honker.open(path)

    async def drain(listener: Any) -> None:
        async for _ in listener:
            pass

    tasks = [asyncio.create_task(drain(db.listen(f"bench:idle{i}"))) for i in range(count)]
    await _idle(seconds)
    for task in tasks:
        task.cancel()
    db.close()


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "publish-ours":
        asyncio.run(publish_ours(args[0], args[1]))
    elif command == "publish-raw":
        publish_raw(args[0], args[1])
    elif command == "idle-ours":
        asyncio.run(idle_ours(args[0], int(args[1]), float(args[2])))
    elif command == "idle-raw":
        asyncio.run(idle_raw(args[0], int(args[1]), float(args[2])))
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
