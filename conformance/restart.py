"""Reliability cases that stop, restart or kill processes: the broker, or a consumer.

Mix :class:`BrokerRestartSuite` into a test class that provides three fixtures:

* ``factory`` -- as for :class:`TransportSuite`: makes a new connected transport;
* ``url`` -- the URL ``factory`` connects to (a child process connects with it);
* ``broker`` -- the broker behind it, with ``restart(downtime: float = 0)``,
  ``kill()`` and ``start()`` (``tests/brokers.py`` servers have these). Use a
  broker of the test's own (function scope, persistence on), never a shared one.

Durable transports are given a short redelivery time in ``url`` (Redis
``claim_idle``, JetStream ack wait) so that a killed member's events come back
within these cases' time bounds.

Ephemeral transports cannot keep what is published while the broker is down;
what they must do is come back: resume delivery within seconds of each
restart, count the reconnects, and deliver what is published afterwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pytest

from alkpubsub import ConnectionLost, Event, PublishError, Subscription, Transport

from .suite import SuiteFixtures, TransportFactory, unique

RESUME_WITHIN = 5.0
"""Seconds after a restart by which an ephemeral subscription delivers again."""
EVENTS = 5000
"""Events published across the two restarts."""
PUBLISHERS = 4
PACE = 0.003
"""Pause after each publish, so publishing spans both restarts (~4 s) even on
transports whose client buffers publishes while disconnected (NATS core)."""


class Broker(Protocol):
    """What the cases need of a broker fixture."""

    def restart(self, downtime: float = 0) -> Any: ...

    def kill(self) -> None: ...

    def start(self) -> Any: ...


async def publish_retrying(
    transport: Transport, topic: str, payload: Any, *, within: float = 30.0
) -> Event:
    """Publish, retrying while the broker is away (as a careful publisher does)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            return await transport.publish(topic, payload)
        except (ConnectionLost, PublishError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def wait_until(
    check: Callable[[], bool], within: float, what: str | Callable[[], str]
) -> None:
    """Poll ``check`` until it holds, or fail naming ``what`` (text, or a
    callable giving it at the time of failure)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"not within {within} s: {what() if callable(what) else what}")
        await asyncio.sleep(0.02)


class _Receiver:
    """Drains a subscription in the background, acking durable events."""

    def __init__(self, sub: Subscription, durable: bool) -> None:
        self.sub = sub
        self.durable = durable
        self.ids: set[str] = set()
        self.payloads: set[Any] = set()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self.sub:
            if self.durable:
                await self.sub.ack(event)
            self.ids.add(event.id)
            self.payloads.add(event.payload)


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import alkpubsub

    async def main(url, topic, consumer, ack_first):
        transport = await alkpubsub.connect(url)
        async with transport.subscribe(topic, consumer=consumer, buffer=10_000) as sub:
            print("ready", flush=True)
            seen = 0
            async for event in sub:
                seen += 1
                if seen <= ack_first:
                    await sub.ack(event)
                    print("acked", event.id, flush=True)
                else:
                    print("held", event.id, flush=True)   # never acked: killed first

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
    """
)


class BrokerRestartSuite(SuiteFixtures):
    """Restart and crash cases. Needs ``factory``, ``url`` and ``broker`` fixtures."""

    @pytest.fixture
    def broker(self) -> Broker:
        raise NotImplementedError("define a `broker` fixture: the server behind `factory`")

    @pytest.fixture
    def url(self) -> str:
        raise NotImplementedError("define a `url` fixture: the URL `factory` connects to")

    @pytest.mark.timeout(60)
    async def test_broker_restarts_twice_while_publishing(
        self, connect: TransportFactory, broker: Broker
    ) -> None:
        publisher, subscriber = await connect(), await connect()
        caps = subscriber.capabilities
        durable = caps.persistent and caps.consumer_offsets
        topic = unique()
        consumer = unique("c") if durable else None
        sub = subscriber.subscribe(topic, consumer=consumer, buffer=EVENTS * 2)
        await sub.start()
        receiver = _Receiver(sub, durable)
        sent: list[Event] = []
        per_publisher = EVENTS // PUBLISHERS

        async def publish(index: int) -> None:
            for i in range(per_publisher):
                n = index * per_publisher + i
                sent.append(await publish_retrying(publisher, topic, n))
                await asyncio.sleep(PACE)

        publishers = [asyncio.create_task(publish(i)) for i in range(PUBLISHERS)]
        for round_ in (1, 2):
            mark = EVENTS * round_ // 3

            def published(mark: int = mark) -> bool:
                return len(sent) >= mark or all(p.done() for p in publishers)

            await wait_until(published, 30, f"{mark} events published")
            assert len(sent) < EVENTS, "publishing ended before the restart; slow it down"
            await asyncio.to_thread(broker.restart)
            if not durable:

                def reconnected(count: int = round_) -> bool:
                    return sub.stats.reconnects >= count

                await wait_until(
                    reconnected,
                    RESUME_WITHIN,
                    f"the subscription counted reconnect {round_} after a broker restart",
                )
            await self._probe(publisher, topic, receiver, f"restart {round_}", durable)
        await asyncio.gather(*publishers)
        if durable:
            # At least once: every acknowledged publish arrives, to the consumer group.
            await wait_until(
                lambda: all(e.id in receiver.ids for e in sent),
                20,
                lambda: (
                    f"all {len(sent)} accepted events arrived "
                    f"({len({e.id for e in sent} - receiver.ids)} missing)"
                ),
            )
            assert set(range(EVENTS)) <= receiver.payloads
        else:
            # The gap is visible: reconnects counted; what follows the restart arrives.
            assert sub.stats.reconnects >= 2
            after = [await publisher.publish(topic, f"after-{i}") for i in range(100)]
            await wait_until(
                lambda: all(e.id in receiver.ids for e in after),
                RESUME_WITHIN,
                "the events published after the last restart arrived",
            )
        await sub.close()
        receiver.task.cancel()

    @staticmethod
    async def _probe(
        publisher: Transport, topic: str, receiver: _Receiver, after: str, durable: bool
    ) -> None:
        """Publish probes until one is delivered: delivery has resumed."""
        loop = asyncio.get_running_loop()
        within = 15.0 if durable else RESUME_WITHIN
        deadline = loop.time() + within
        probes: set[str] = set()
        while not probes & receiver.ids:
            if loop.time() > deadline:
                pytest.fail(f"no event published after {after} was delivered within {within} s")
            probes.add((await publish_retrying(publisher, topic, f"probe {after}")).id)
            await asyncio.sleep(0.1)

    @pytest.mark.timeout(60)
    async def test_killed_consumer_events_go_to_another_member(
        self, connect: TransportFactory, url: str, tmp_path: Path
    ) -> None:
        transport = await connect()
        if not transport.capabilities.competing_consumers:
            return  # only a group with several members can take over a dead one's work
        topic, consumer = unique(), unique("c")
        script = tmp_path / "member.py"
        script.write_text(_CHILD)
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            url,
            topic,
            consumer,
            "10",
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        acked: set[str] = set()
        held: set[str] = set()
        try:
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), 15)
            assert line.strip() == b"ready", line
            sent = await transport.publish_many([(topic, i) for i in range(200)])
            # Let the child take its share; it acks 10 and holds the rest unacked.
            async with asyncio.timeout(15):
                while len(held) < 20:
                    kind, _, event_id = (await child.stdout.readline()).decode().partition(" ")
                    (acked if kind == "acked" else held).add(event_id.strip())
        finally:
            if child.returncode is None:
                os.kill(child.pid, signal.SIGKILL)  # mid-batch: no close, no acks flushed
            await child.wait()
        assert child.returncode == -signal.SIGKILL
        got: set[str] = set()
        async with transport.subscribe(topic, consumer=consumer) as member:
            want = {e.id for e in sent} - acked
            try:
                async with asyncio.timeout(20):
                    while not want <= got:
                        event = await member.__anext__()
                        await member.ack(event)
                        got.add(event.id)
            except TimeoutError:
                pytest.fail(
                    f"{len(want - got)} of {len(want)} events never reached the other member "
                    f"({len(held - got)} of the {len(held)} the killed member held)"
                )
            assert held <= got
            assert member.stats.redelivered >= 1
