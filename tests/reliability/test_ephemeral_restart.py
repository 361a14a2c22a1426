"""Ephemeral broker transports come back after their broker restarts, and the gap is counted.

A publisher publishes a numbered event every few milliseconds to a subscriber
on another connection while the broker is SIGKILLed and started again half a
second later, then stopped gracefully and started again. For each restart the test measures:

* ``resume``: seconds from the broker serving again to the subscriber receiving
  the first event published after that moment (asserted <= 5 s);
* ``gap``: events whose publish returned after the broker was back but that
  never arrived (the subscription was not yet re-established: reported, not
  asserted: pub/sub keeps nothing for an absent subscriber);
* ``outage``: events whose publish returned while the broker was down (NATS
  buffers them client-side) and how many of those arrived;
* ``stats.reconnects`` (asserted: one per restart).

What is asserted beyond resume: once an event published after the restart has
arrived, every later one arrives too (at most once is not "sometimes").
Unlike ``conformance/restart.py`` (graceful restarts, resume only), this
counts what was lost and when.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from brokers import BrokerServer, NatsServer, RedisServer

import alkpubsub
from alkpubsub.conformance import unique

RESUME_WITHIN = 5.0
"""Seconds from the broker serving again to delivery resuming (DESIGN: seconds)."""
PACE = 0.005
"""Seconds between publishes: ~200 events/s, enough to count a gap in events."""
FLOWING = 100
"""Events received after a restart before the next one, proof delivery is steady."""
DOWNTIME = 0.5
"""Seconds the broker stays down: long enough that publishes meet the outage
(kill + start alone take ~30 ms here)."""


async def bounded(step: Awaitable[object], what: str, within: float = 10.0) -> None:
    """Await ``step``, failing the test (naming it) if it takes over ``within`` s."""
    try:
        async with asyncio.timeout(within):
            await step
    except TimeoutError:
        pytest.fail(f"{what} did not finish within {within} s")


@dataclass
class Round:
    """One broker restart and what it cost."""

    how: str
    down: float
    back: float
    resume: float | None = None
    first_after: int | None = None  # number of the first event after `back` that arrived
    late_loss: list[int] = field(default_factory=list)  # missing, though after first_after


@pytest.fixture(params=["redis", "nats"])
def ephemeral_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerServer]:
    """A broker of this test's own for the ephemeral transport."""
    server: BrokerServer
    if request.param == "redis":
        server = RedisServer(base_dir=tmp_path / "redis", appendonly=False)
    else:
        server = NatsServer(base_dir=tmp_path / "nats", jetstream=False)
    with server:
        yield server


@pytest.mark.timeout(90)
async def test_ephemeral_delivery_resumes_after_broker_restart(
    ephemeral_target: BrokerServer, request: pytest.FixtureRequest, figures: Callable[[str], None]
) -> None:
    broker, name = ephemeral_target, request.node.callspec.id
    publisher = await alkpubsub.connect(broker.url)
    subscriber = await alkpubsub.connect(broker.url)
    topic = unique("restart")
    sub = subscriber.subscribe(topic, buffer=100_000)
    await sub.start()
    arrived: dict[int, float] = {}
    accepted: dict[int, float] = {}  # number -> when its publish returned
    failed = 0

    async def receive() -> None:
        async for event in sub:
            arrived[event.payload] = time.monotonic()

    async def publish() -> None:
        nonlocal failed
        n = 0
        while True:
            try:
                await publisher.publish(topic, n)
                accepted[n] = time.monotonic()
            except (alkpubsub.ConnectionLost, alkpubsub.PublishError):
                failed += 1
            n += 1
            await asyncio.sleep(PACE)

    async def until(check: Callable[[], bool], within: float) -> bool:
        deadline = time.monotonic() + within
        while not check():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    tasks = [asyncio.create_task(receive()), asyncio.create_task(publish())]
    rounds: list[Round] = []
    try:
        assert await until(lambda: len(arrived) >= FLOWING, 10), "no delivery before restarts"
        for how in ("kill", "stop"):
            down = time.monotonic()
            # In a thread: the publisher and subscriber keep running meanwhile.
            await bounded(asyncio.to_thread(broker.kill if how == "kill" else broker.stop), how)
            await asyncio.sleep(DOWNTIME)
            await bounded(asyncio.to_thread(broker.start), "broker start", 30)
            current = Round(how, down, time.monotonic())
            rounds.append(current)

            def resumed(r: Round = current) -> bool:
                after = [n for n, t in accepted.items() if t >= r.back and n in arrived]
                if after:
                    r.first_after = min(after)
                    r.resume = arrived[r.first_after] - r.back
                return bool(after)

            await until(resumed, RESUME_WITHIN + 5)  # measured beyond the bound, asserted below
            target = len(arrived) + FLOWING

            def flowing(target: int = target) -> bool:
                return len(arrived) >= target

            await until(flowing, 10)
        tasks[1].cancel()  # stop publishing, then let the last accepted event arrive
        await bounded(asyncio.gather(tasks[1], return_exceptions=True), "the publisher ending")
        last = max(accepted)
        await until(lambda: last in arrived, 5)
    finally:
        for task in tasks:
            task.cancel()
        reconnects = sub.stats.reconnects
        await bounded(asyncio.gather(*tasks, return_exceptions=True), "the test's tasks ending")
        await bounded(subscriber.close(), "subscriber.close()")
        await bounded(publisher.close(), "publisher.close()")

    parts = []
    for i, r in enumerate(rounds):
        end = rounds[i + 1].down if i + 1 < len(rounds) else float("inf")
        during = [n for n, t in accepted.items() if r.down <= t < r.back]
        after = [n for n, t in accepted.items() if r.back <= t < end]
        gap = [n for n in after if n not in arrived]
        resume = "none" if r.resume is None else f"{r.resume:.2f}s"
        parts.append(
            f"{r.how}: down={r.back - r.down:.2f}s resume={resume} gap={len(gap)} "
            f"outage_accepted={len(during)} outage_arrived={sum(n in arrived for n in during)}"
        )
        r.late_loss = [n for n in gap if r.first_after is not None and n > r.first_after]
    figures(
        f"RELIABILITY {name} broker-restart: sent={len(accepted)} failed_publishes={failed} "
        f"{' | '.join(parts)} reconnects={reconnects}"
    )
    for r in rounds:
        assert r.resume is not None and r.resume <= RESUME_WITHIN, (
            f"after the broker {r.how}, delivery resumed in {r.resume} s (bound {RESUME_WITHIN} s)"
        )
        assert not r.late_loss, (
            f"after the {r.how}, {len(r.late_loss)} events published after delivery had "
            f"resumed never arrived, e.g. {r.late_loss[:5]}"
        )
    assert reconnects >= len(rounds), f"stats.reconnects={reconnects} after {len(rounds)} restarts"
