"""Opening, closing and abandoning subscriptions leaves nothing behind, on every transport.

Per transport: 100 subscriptions entered at once (``asyncio.gather``) while
events are published, every one receiving, half of them closed at once while
traffic flows, then the subscribing transport closed under the other half
(their iterators must end), then the publishing transport closed while a
publish is in flight. Afterwards, within a bounded settle time, no asyncio
task, thread or file descriptor may remain beyond what existed before.

Before the baseline the event loop's default executor is filled to its size
(``min(32, cpus + 4)`` threads): transports run blocking calls there with
``asyncio.to_thread``, and those threads are the loop's, reused, and ended when
the loop closes, not something a transport leaks.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from brokers import NatsServer, RedisServer
from leak_snapshot import settle, take

import alkpubsub
from alkpubsub.conformance import unique

SUBSCRIPTIONS = 100
ENTER_WITHIN = 30.0
"""Seconds for all subscriptions to be live together (each takes milliseconds)."""
TRAFFIC = 200
"""Events published to the 100 live readers before closing starts."""
SETTLE_WITHIN = 5.0
"""Seconds after closing for tasks, threads and descriptors to go away."""
TRANSPORTS = [
    "memory",
    "honker",
    "honker+durable",
    "redis",
    "redis+durable",
    "nats",
    "nats+durable",
]


@pytest.fixture(params=TRANSPORTS)
def leak_url(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_server_session: RedisServer,
    nats_server_session: NatsServer,
) -> str:
    """A URL of the transport, on a session broker with names of this test's own."""
    kind = request.param
    if kind == "memory":
        return f"memory://{unique('leaks')}"
    if kind.startswith("honker"):
        return f"{kind}://{tmp_path}/leaks.db"
    if kind.startswith("redis"):
        base = redis_server_session.url.replace("redis://", f"{kind}://")
        return (
            f"{base}?prefix={unique('p')}:" if kind == "redis" else f"{base}?stream={unique('S')}"
        )
    base = nats_server_session.url.replace("nats://", f"{kind}://")
    return f"{base}?prefix={unique('p')}" if kind == "nats" else f"{base}?stream={unique('S')}"


async def fill_default_executor() -> None:
    """Start every thread of the loop's default executor now, before the baseline."""
    workers = min(32, (os.cpu_count() or 1) + 4)
    await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.05) for _ in range(workers)))


async def exercise(url: str, durable: bool, own: set[asyncio.Task[object]]) -> tuple[int, str]:
    """The traffic of one run (see the module docstring); returns the events
    published and how the publish in flight at close ended."""
    publisher = await alkpubsub.connect(url)
    subscriber = await alkpubsub.connect(url)
    topic = unique("leaks")
    published = 0
    ended = "returned"  # the publish racing publisher.close(): returned, or its error
    flowing = asyncio.Event()  # set once TRAFFIC events went to the live readers
    mark = -1

    async def publish() -> None:
        nonlocal published, ended
        try:
            while True:
                await publisher.publish(topic, published)
                published += 1
                if published == mark:
                    flowing.set()
                await asyncio.sleep(0.001)
        # A publish racing close() ends with Closed, or (Honker, when the store
        # closes under a queued write) PublishError "nothing of this publish was
        # stored"; either way it must end, and nothing may be left behind.
        except (alkpubsub.Closed, alkpubsub.PublishError) as exc:
            ended = type(exc).__name__

    async def read(sub: alkpubsub.Subscription) -> None:
        async for event in sub:
            await sub.ack(event)

    pumping = asyncio.create_task(publish(), name="leaks publisher")
    own.add(pumping)
    subs = [
        subscriber.subscribe(topic, consumer=unique("c") if durable else None, buffer=16)
        for _ in range(SUBSCRIPTIONS)
    ]
    try:
        async with asyncio.timeout(ENTER_WITHIN):
            await asyncio.gather(*(sub.start() for sub in subs))
    except TimeoutError:
        pytest.fail(
            f"{SUBSCRIPTIONS} subscriptions entered with asyncio.gather were not all live "
            f"within {ENTER_WITHIN} s ({sum(s.stats.delivered > 0 for s in subs)} delivering)"
        )
    async with asyncio.timeout(20):
        await asyncio.gather(*(sub.get() for sub in subs))  # every one is live
    readers = [asyncio.create_task(read(sub), name="leaks reader") for sub in subs]
    own.update(readers)
    mark = published + TRAFFIC
    async with asyncio.timeout(20):
        await flowing.wait()  # closing happens with events in flight to every reader
    async with asyncio.timeout(20):
        await asyncio.gather(*(sub.close() for sub in subs[: SUBSCRIPTIONS // 2]))
        await subscriber.close()  # under the other half, events still arriving
        await asyncio.gather(*readers)  # their iterators end
        await asyncio.sleep(0.01)  # a publish is in flight more often than not
        await publisher.close()
        await pumping
    return published, ended


@pytest.mark.timeout(120)
async def test_subscriptions_and_transports_leave_nothing_behind(
    leak_url: str, request: pytest.FixtureRequest, figures: Callable[[str], None]
) -> None:
    name = request.node.callspec.id
    await fill_default_executor()
    baseline = take()
    own: set[asyncio.Task[object]] = set()
    published, ended = await exercise(leak_url, "durable" in name, own)
    leaks = await settle(baseline, own, SETTLE_WITHIN)
    figures(
        f"RELIABILITY {name} leaks: subscriptions={SUBSCRIPTIONS} (entered and half closed "
        f"with gather, transport closed under the rest) published={published} "
        f"tasks_left={len(leaks.tasks)} threads_left={len(leaks.threads)} "
        f"fds_left={len(leaks.fds)} settled_in={leaks.settled_in:.2f}s "
        f"publish_at_close={ended}"
    )
    assert not leaks, f"{name} left behind after closing:\n{leaks.describe()}"


async def test_the_leak_check_names_what_is_left() -> None:
    """The check itself: a task, a thread and a socket left open are each named."""
    baseline = take()
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="left-thread", daemon=True)
    thread.start()
    task = asyncio.create_task(asyncio.sleep(60), name="left-task")
    sock = socket.socket()
    inode = os.fstat(sock.fileno()).st_ino
    try:
        leaks = await settle(baseline, set(), within=0.2)
    finally:
        sock.close()
        task.cancel()
        release.set()
        thread.join(5)
    assert [t.split(":")[0] for t in leaks.tasks] == ["left-task"]
    assert leaks.threads == ["left-thread"]
    assert leaks.fds == [f"socket:[{inode}]"]
