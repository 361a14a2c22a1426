"""JetStream consumers shared by several members: a member killed while it holds
its prefetch stalls only the events it held, never the consumer."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from brokers import NatsServer
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

import alkpubsub
from alkpubsub.conformance import collect, collect_acking, nothing_more, unique

_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    import alkpubsub

    async def main(url, topic, consumer):
        transport = await alkpubsub.connect(url)
        async with transport.subscribe(topic, consumer=consumer, start="earliest") as sub:
            async for event in sub:
                print(event.id, flush=True)  # held, never acked: killed first

    asyncio.run(main(*sys.argv[1:4]))
    """
)


@pytest.fixture
async def js(nats_server_session: NatsServer) -> AsyncIterator[JetStreamContext]:
    """A plain nats-py JetStream context, to look at the server's side."""
    nc = await nats.connect(nats_server_session.url)
    yield nc.jetstream()
    await nc.close()


async def _read_lines(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode().strip())


async def _until_full(js: JetStreamContext, stream: str, consumer: str, held: list[str]) -> None:
    """Wait until the member has taken all it will take: the server counts as
    many deliveries awaiting an ack as the member printed, unchanged for 0.5 s."""
    loop = asyncio.get_running_loop()
    last, since = -1, loop.time()
    async with asyncio.timeout(30):
        while True:
            try:
                pending = (await js.consumer_info(stream, consumer)).num_ack_pending
            except NotFoundError:  # the member has not made it yet
                pending = 0
            if pending != last or pending != len(held) or pending == 0:
                last, since = pending, loop.time()
            elif loop.time() - since >= 0.5:
                return
            await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_member_killed_holding_its_prefetch_stalls_only_its_own_events(
    nats_server_session: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    # A backlog larger than the server's default max_ack_pending (1000): a
    # member that takes all it may while never acking, then is SIGKILLed.
    # The survivor must get events published after the kill at once (< 2 s),
    # and the dead member's events after ack_wait (6 s), not before.
    ack_wait, backlog = 6.0, 1500
    stream, topic, consumer = unique("S"), "jobs", "workers"
    url = nats_server_session.url.replace("nats://", "nats+durable://")
    url += f"?stream={stream}&ack_wait={ack_wait:g}"
    loop = asyncio.get_running_loop()
    async with await alkpubsub.connect(url) as transport:
        await transport.publish_many([(topic, i) for i in range(backlog)])
        script = tmp_path / "holder.py"
        script.write_text(_HOLDER)
        spawned = loop.time()
        child = await asyncio.create_subprocess_exec(
            sys.executable, str(script), url, topic, consumer, stdout=asyncio.subprocess.PIPE
        )
        held: list[str] = []
        assert child.stdout is not None
        reader = asyncio.create_task(_read_lines(child.stdout, held))
        try:
            await _until_full(js, stream, consumer, held)
        finally:
            os.kill(child.pid, signal.SIGKILL)  # no close: its deliveries stay unacked
            await child.wait()
            await reader
        assert child.returncode == -signal.SIGKILL
        assert held, "the member took nothing before it was killed"

        async with transport.subscribe(topic, consumer=consumer) as survivor:
            published = loop.time()
            new = {e.id for e in await transport.publish_many([(topic, i) for i in range(20)])}
            arrived: dict[str, float] = {}
            try:
                async with asyncio.timeout(ack_wait + 20):
                    while not (new | set(held)) <= set(arrived):
                        event = await survivor.__anext__()
                        await survivor.ack(event)
                        arrived.setdefault(event.id, loop.time())
            except TimeoutError:
                missing = (new | set(held)) - set(arrived)
                pytest.fail(f"{len(missing)} events never reached the survivor")
            new_latency = max(arrived[i] for i in new) - published
            first_redelivery = min(arrived[i] for i in held)
            assert new_latency < 2.0, (
                f"new events waited {new_latency:.1f} s behind the {len(held)} events "
                f"the killed member held"
            )
            # Delivered to the member after it was spawned, so not back before then + ack_wait.
            assert first_redelivery >= spawned + ack_wait
            assert survivor.stats.redelivered >= len(held)


async def test_existing_consumer_is_given_the_urls_ack_wait_and_max_ack_pending(
    nats_server_session: NatsServer, js: JetStreamContext
) -> None:
    # Made earlier with the server's defaults (ack_wait 30 s, max_ack_pending
    # 1000), e.g. by an older version: opening a member brings it to the URL's.
    stream = unique("S")
    url = nats_server_session.url.replace("nats://", "nats+durable://")
    url += f"?stream={stream}&ack_wait=5&max_deliveries=3"
    async with await alkpubsub.connect(url) as transport:
        config = ConsumerConfig(
            durable_name="old", ack_policy=AckPolicy.EXPLICIT, filter_subject=f"{stream}.jobs"
        )
        await js.add_consumer(stream, config)
        async with transport.subscribe("jobs", consumer="old") as sub:
            sent = await transport.publish("jobs", 1)
            [got] = await collect_acking(sub, 1)
            assert got.id == sent.id
        info = await js.consumer_info(stream, "old")
    assert info.config.ack_wait == 5
    assert info.config.max_ack_pending == 10_000
    assert info.config.max_deliver == 4  # one past max_deliveries, to dead-letter it


async def test_new_consumer_has_max_ack_pending_set(
    nats_server_session: NatsServer, js: JetStreamContext
) -> None:
    stream = unique("S")
    url = nats_server_session.url.replace("nats://", "nats+durable://")
    url += f"?stream={stream}&max_ack_pending=600&prefetch=300"
    async with await alkpubsub.connect(url) as transport, transport.subscribe("a", consumer="c"):
        info = await js.consumer_info(stream, "c")
    assert info.config.max_ack_pending == 600


async def test_member_holds_at_most_prefetch_unacked_events(
    nats_server_session: NatsServer,
) -> None:
    # Like RabbitMQ's prefetch count: 8 handed out and not acked, then nothing
    # more until acks free half a batch (4), although 50 are waiting.
    url = nats_server_session.url.replace("nats://", "nats+durable://")
    url += f"?stream={unique('S')}&prefetch=8&max_ack_pending=16"
    async with (
        await alkpubsub.connect(url) as transport,
        transport.subscribe("a", consumer="c") as sub,
    ):
        sent = await transport.publish_many([("a", i) for i in range(50)])
        first = await collect(sub, 8)
        await nothing_more(sub, 0.5)
        for event in first[:4]:
            await sub.ack(event)
        more = await collect(sub, 4)
        await nothing_more(sub, 0.5)
    assert [e.id for e in first + more] == [e.id for e in sent[:12]]


async def test_member_holding_prefetch_past_ack_wait_reads_again(
    nats_server_session: NatsServer,
) -> None:
    # Deliveries held past ack_wait are the server's again: the member must
    # not wait for acks that free nothing, it takes the redeliveries.
    url = nats_server_session.url.replace("nats://", "nats+durable://")
    url += f"?stream={unique('S')}&prefetch=2&max_ack_pending=4&ack_wait=1"
    async with (
        await alkpubsub.connect(url) as transport,
        transport.subscribe("a", consumer="c") as sub,
    ):
        sent = await transport.publish_many([("a", i) for i in range(3)])
        first = await collect(sub, 2)
        # Under load the third event may be pulled before the first's ack_wait
        # fires: wait for the redelivery among the next deliveries.
        again = await collect(sub, 1, timeout=10)
        if again[0].id != first[0].id:
            again += await collect(sub, 1, timeout=10)
        assert first[0].id in [e.id for e in again]
        assert sub.stats.redelivered >= 1
    assert [e.id for e in first] == [e.id for e in sent[:2]]


async def test_members_entered_concurrently_are_all_live(nats_server_session: NatsServer) -> None:
    # Seen on redis://: subscriptions entered through asyncio.gather hung. Here
    # 8 members of one consumer (created by whichever asks first) and 8
    # consumers of their own enter at once; the members split the events, each
    # own consumer gets all of them.
    url = nats_server_session.url.replace("nats://", "nats+durable://")
    async with await alkpubsub.connect(f"{url}?stream={unique('S')}") as transport:
        shared = [transport.subscribe("a:*", consumer="shared") for _ in range(8)]
        own = [transport.subscribe("a:*", consumer=f"own{i}") for i in range(8)]
        async with asyncio.timeout(15):
            await asyncio.gather(*(sub.__aenter__() for sub in shared + own))
        try:
            sent = {e.id for e in await transport.publish_many([("a:x", i) for i in range(40)])}
            for sub in own:
                assert {e.id for e in await collect_acking(sub, 40)} == sent
            got: list[str] = []
            async with asyncio.timeout(15):
                while len(got) < len(sent):
                    for sub in shared:
                        while sub.buffered:
                            event = await sub.__anext__()
                            await sub.ack(event)
                            got.append(event.id)
                    await asyncio.sleep(0.01)
            assert sorted(got) == sorted(sent)
        finally:
            await asyncio.gather(*(sub.close() for sub in shared + own))
