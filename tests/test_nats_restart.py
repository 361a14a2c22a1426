"""Broker restarts and a SIGKILLed group member, on both NATS transports.

Each case owns its nats-server (``nats_server``), restarts it for real and
kills a subscriber process with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap

import nats
import pytest
from brokers import NatsServer

import alkpubsub
from alkpubsub import ConnectionLost, PublishError, Subscription, Transport
from alkpubsub.conformance import collect, collect_acking

TOTAL = 5000


async def publish_with_retries(transport: Transport, topic: str, sent: list[str]) -> None:
    """Publish TOTAL events, retrying each (as an application would) until accepted."""
    for i in range(TOTAL):
        while True:
            try:
                sent.append((await transport.publish(topic, i)).id)
                break
            except (PublishError, ConnectionLost):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0)  # a core NATS publish never waits: let the restarts run


async def restart_twice(server: NatsServer, sent: list[str], sub: Subscription) -> None:
    """Restart the broker at 20 % and 50 % of the publishing, each time waiting
    until ``sub`` is reconnected, so there are two distinct outages."""
    for n, mark in enumerate((TOTAL // 5, TOTAL // 2), start=1):
        while len(sent) < mark:  # noqa: ASYNC110 - waits for the publisher's progress
            await asyncio.sleep(0.005)
        await asyncio.to_thread(server.restart)
        async with asyncio.timeout(20):
            while sub.stats.reconnects < n:  # noqa: ASYNC110 - polls stats
                await asyncio.sleep(0.01)


async def test_durable_stream_loses_nothing_across_two_broker_restarts(
    nats_server: NatsServer,
) -> None:
    url = nats_server.url.replace("nats://", "nats+durable://") + "?stream=R&publish_timeout=30"
    publisher, consumer = await alkpubsub.connect(url), await alkpubsub.connect(url)
    try:
        async with consumer.subscribe("load", consumer="c", start="earliest") as sub:
            sent: list[str] = []
            await asyncio.gather(
                publish_with_retries(publisher, "load", sent),
                restart_twice(nats_server, sent, sub),
            )
            seen: set[str] = set()
            while len(seen) < TOTAL:
                seen.update(e.id for e in await collect_acking(sub, 1, timeout=30))
            # Every accepted event arrives; an ack lost in a restart may bring
            # one back (at least once), but none is missing or stored twice.
            assert seen == set(sent) and len(sent) == TOTAL
            assert sub.stats.reconnects == 2
    finally:
        await publisher.close()
        await consumer.close()
    nc = await nats.connect(nats_server.url)
    try:  # the stream holds each event once: retries carried the same Nats-Msg-Id
        assert (await nc.jetstream().stream_info("R")).state.messages == TOTAL
    finally:
        await nc.close()


async def test_live_subscription_keeps_working_across_two_broker_restarts(
    nats_server: NatsServer,
) -> None:
    publisher, subscriber = (
        await alkpubsub.connect(nats_server.url),
        await alkpubsub.connect(nats_server.url),
    )
    try:
        async with subscriber.subscribe("load", buffer=2 * TOTAL) as sub:
            sent: list[str] = []
            await asyncio.gather(
                publish_with_retries(publisher, "load", sent),
                restart_twice(nats_server, sent, sub),
            )
            # At most once: events in flight during a restart may be lost. Once
            # the subscription is back, all 100 published afterwards arrive.
            after = [(await publisher.publish("load", "after")).id for _ in range(100)]
            got: list[str] = []
            while not set(after) <= set(got):
                got.append((await sub.get(timeout=10)).id)
            assert len(got) == len(set(got)), "an event arrived twice"
            assert set(got) <= {*sent, *after}
            assert sub.stats.reconnects == 2
    finally:
        await publisher.close()
        await subscriber.close()


MEMBER = textwrap.dedent(
    """
    import asyncio, sys
    import alkpubsub

    async def main(url: str) -> None:
        transport = await alkpubsub.connect(url)
        async with transport.subscribe("work", consumer="group") as sub:
            print("ready", flush=True)
            for _ in range(10):
                await sub.__anext__()  # received, never acked
            print("holding", flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.parametrize("ack_wait", [1])
async def test_sigkilled_members_unacked_events_go_to_another_member(
    nats_server: NatsServer, ack_wait: int
) -> None:
    url = (
        nats_server.url.replace("nats://", "nats+durable://")
        + f"?stream=K&ack_wait={ack_wait}&batch=10"
    )
    member = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MEMBER, url, stdout=asyncio.subprocess.PIPE
    )
    assert member.stdout is not None
    transport = await alkpubsub.connect(url)
    try:
        assert await asyncio.wait_for(member.stdout.readline(), 20) == b"ready\n"
        sent = {(await transport.publish("work", i)).id for i in range(10)}
        assert await asyncio.wait_for(member.stdout.readline(), 20) == b"holding\n"
        os.kill(member.pid, signal.SIGKILL)
        await member.wait()
        # The other member gets all ten once ack_wait (1 s) has run out for them.
        async with transport.subscribe("work", consumer="group") as other:
            got = await collect(other, 10, timeout=15)
            for event in got:
                await other.ack(event)
            assert {e.id for e in got} == sent
            assert other.stats.redelivered == 10
    finally:
        if member.returncode is None:
            member.kill()
            await member.wait()
        await transport.close()
