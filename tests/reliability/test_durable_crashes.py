"""Durable transports lose nothing when consumer, publisher and broker are SIGKILLed.

The scenario is in ``crash_scenario.py``: 10,000 events; the consumer process
killed three times, the publisher once mid-``publish_many``, the broker twice
(for Honker, whose broker is the file, every process holding it); then every
accepted event must have been processed, duplicates only near a crash, and
delivery must have resumed after every restart.

Brokers: Redis with AOF and ``appendfsync always`` (with Redis's default
``everysec``, Redis may reply to a write it has not yet written to the AOF
while a background fsync runs, so a SIGKILL can lose acknowledged events; see
docs/reliability.md); NATS with the JetStream file store. Redelivery timers are
short so a killed consumer's events come back within the run: Redis
``claim_idle=1``, JetStream ``ack_wait=2``.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from brokers import NatsServer, RedisServer
from crash_children import Children
from crash_scenario import BATCH, Broker, CrashScenario

import alkpubsub

WINDOW = 1.0
"""Seconds before a crash within which a duplicate's first processing must fall.
Each transport acks right away (Honker: one position save in flight; Redis: one
batched XACK in flight; JetStream: the ack message in the client's outbound
buffer), so what a crash can lose is the acks of the last few milliseconds;
1 s leaves room for a loaded 2-core machine."""
RESUMED_WITHIN = 20.0
"""Seconds from a restart (process spawned, broker serving) to the next event
processed: interpreter start-up, reconnect, and Redis's claim_idle / JetStream's
ack_wait for the killed consumer's events."""
QUIET = 3.0
"""Seconds a fresh member of the consumer listens after the run: longer than every
redelivery timer here (claim_idle 1 s + the 1 s claim period; ack_wait 2 s)."""

STORED_TWICE_AT_MOST = {"honker+durable": 0, "redis+durable": 2 * BATCH, "nats+durable": 0}
"""Event ids that may be stored more than once. Redis: a publish redis-py retried
after the server took it but the reply was lost (its docstring says so); one
``publish_many`` call of ``BATCH`` events is in flight at each of the two broker
kills. JetStream drops a re-sent ``Nats-Msg-Id``; Honker does not retry."""

DurableTarget = tuple[str, Broker | None]


@pytest.fixture(params=["honker+durable", "redis+durable", "nats+durable"])
def durable_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DurableTarget]:
    """A durable URL on a broker of this test's own (None for Honker)."""
    kind = request.param
    if kind == "honker+durable":
        yield f"honker+durable://{tmp_path}/events.db?stream=events", None
    elif kind == "redis+durable":
        with RedisServer(base_dir=tmp_path / "redis", appendfsync="always") as redis:
            base = redis.url.replace("redis://", "redis+durable://")
            yield f"{base}?stream=crash&claim_idle=1", redis
    else:
        with NatsServer(base_dir=tmp_path / "nats") as nats:
            base = nats.url.replace("nats://", "nats+durable://")
            yield f"{base}?stream=CRASH&ack_wait=2", nats


async def listen_quietly(url: str, topic: str, consumer: str) -> list[alkpubsub.Event]:
    """What a new member of ``consumer`` receives within ``QUIET`` seconds."""
    transport = await alkpubsub.connect(url)
    got: list[alkpubsub.Event] = []
    try:
        async with transport.subscribe(topic, consumer=consumer) as sub:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + QUIET
            while (left := deadline - loop.time()) > 0:
                try:
                    event = await sub.get(timeout=left)
                except TimeoutError:
                    break
                got.append(event)
                await sub.ack(event)
    finally:
        await transport.close()
    return got


@pytest.mark.timeout(240)
async def test_durable_consumer_loses_nothing_through_crashes(
    durable_target: DurableTarget,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    figures: Callable[[str], None],
) -> None:
    url, broker = durable_target
    name = request.node.callspec.id
    seed = int(os.environ.get("RELIABILITY_SEED") or random.randrange(1 << 30))
    scenario = CrashScenario(url, broker, tmp_path, seed)
    with Children(tmp_path) as children:
        outcome = await scenario.run(children)
    (tmp_path / "outcome.txt").write_text(outcome.details())  # kept by pytest for a look
    late = await listen_quietly(url, scenario.topic, scenario.consumer_name)
    figures(outcome.line(name, WINDOW, seed) + f" late_redeliveries={len(late)}")

    assert not outcome.lost, (
        f"{len(outcome.lost)} accepted events never processed, e.g. {outcome.lost[:5]}"
    )
    assert outcome.not_whole == 0 and outcome.malformed == 0, "an event arrived damaged"
    assert not outcome.strays, f"events from no unreturned call: numbers {outcome.strays[:10]}"
    unexplained = outcome.unexplained(WINDOW)
    assert not unexplained, (
        f"{len(unexplained)} duplicates first processed more than {WINDOW} s before any "
        f"crash, e.g. {[(i, outcome.ages[i]) for i in unexplained[:5]]}"
    )
    assert outcome.stored_twice <= STORED_TWICE_AT_MOST[name], (
        f"{outcome.stored_twice} event ids stored more than once"
    )
    for crash in outcome.crashes:
        assert crash.resume is not None and crash.resume <= RESUMED_WITHIN, (
            f"no delivery within {RESUMED_WITHIN} s of restarting after the {crash.what} kill"
        )
    assert not late, f"{len(late)} events redelivered after the consumer closed cleanly"
