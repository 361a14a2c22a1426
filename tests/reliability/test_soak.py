"""Soak: many events past one stalled and one fast subscriber, on every transport.

A stalled subscriber (never reads; buffer ``BUFFER``) and a fast one (reads
and acks everything) share one subscribing transport; a second transport
publishes ``ALKPUBSUB_SOAK_EVENTS`` events (20,000 by default, in ``make test``;
``make soak`` sets 1,000,000) in chunks that alternate between two topics,
``soak:solo`` and ``soak:load``. The fast subscriber is one reader on two
subscriptions, one per topic; the stalled one subscribes ``soak:load`` only.
So a solo chunk and a load chunk cost the same (one subscription per topic,
same pattern kind: on NATS and Redis one server-side subscription that both
share) except for the stalled subscriber itself, and alternating chunks
measure the fast rate alone and next to the stalled one in the same run,
under the same machine load. Asserted:

* the fast subscriber's rate with the stalled one present is within 10 % of
  its solo rate, and it received every event, none dropped;
* ephemeral: the stalled subscriber dropped exactly ``load events - BUFFER``
  and holds the last ``BUFFER`` load events, in order;
* durable: the stalled consumer paused with a full buffer, dropped nothing,
  and afterwards reads every load event in order (its lag is reported);
* RSS stays under ``baseline + 4 * (BUFFER + CHUNK) * event size + SLACK``
  (see :func:`rss_bound`): memory does not grow with the number of events.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from brokers import NatsServer, RedisServer
from crash_records import payload

import alkpubsub
from alkpubsub.conformance import unique

EVENTS = int(os.environ.get("ALKPUBSUB_SOAK_EVENTS") or 20_000)
BUFFER = 1000
"""The stalled subscriber's buffer (events)."""
CHUNK = max(1000, EVENTS // 100)
"""Events per timed chunk; at most this many are in flight between publisher and
the fast subscriber, which bounds client-side read buffers."""
BATCH = 100
"""Events per publish_many call."""
LONG = 200_000
"""Runs of at least this many events (``make soak``) assert ``TOLERANCE``."""
TOLERANCE = 0.10 if EVENTS >= LONG else 0.50
"""How much slower the fast subscriber may be next to the stalled one. 10 % in
``make soak`` (1,000,000 events: hundreds of chunk pairs). The 20,000-event run
in ``make test`` has nine pairs of 10-200 ms chunks, and on this shared 2-core
machine identical chunks were measured up to 24 % apart, so there the bound is
50 %: still far from what a stalled subscriber that held up the fast one would
cost (the fast one would stop: the chunk never completes)."""
ORDER = ("soak:solo", "soak:load", "soak:load", "soak:solo")
"""Topics of consecutive chunks, repeated (ABBA)."""
SLACK = 64 << 20
"""Bytes of RSS allowed beyond buffered events: allocator arenas that are not
returned, SQLite page caches (2 MB per connection), client read buffers."""
TRANSPORTS = [
    "memory",
    "honker",
    "honker+durable",
    "redis",
    "redis+durable",
    "nats",
    "nats+durable",
]


def rss() -> int:
    """This process's resident set size in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def event_size() -> int:
    """Bytes one decoded event of this test takes in memory (measured)."""
    event, body = alkpubsub.Event.create("soak:load", payload(123456), origin="soak")
    envelope = event.envelope(body)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        events = [alkpubsub.Event.from_json(envelope) for _ in range(1000)]
        size = (tracemalloc.get_traced_memory()[0] - before) // len(events)
    finally:
        tracemalloc.stop()
    return size


def rss_bound(baseline: int, size: int) -> int:
    """The RSS the run may reach: both subscribers' buffers and the chunk in flight,
    each held up to twice (raw bytes in a client buffer, then the decoded event),
    doubled again for allocator overhead, plus ``SLACK``."""
    return baseline + 4 * (BUFFER + CHUNK) * size + SLACK


@pytest.fixture(params=TRANSPORTS)
def soak_url(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_server_session: RedisServer,
    nats_server_session: NatsServer,
) -> str:
    """A URL of the transport with names of this test's own."""
    kind = request.param
    if kind == "memory":
        return f"memory://{unique('soak')}"
    if kind.startswith("honker"):
        return f"{kind}://{tmp_path}/soak.db"
    if kind.startswith("redis"):
        base = redis_server_session.url.replace("redis://", f"{kind}://")
        if kind == "redis":
            return f"{base}?prefix={unique('p')}:"
        return f"{base}?stream={unique('S')}&maxlen=0"  # no trimming: the stalled one reads all
    base = nats_server_session.url.replace("nats://", f"{kind}://")
    if kind == "nats":
        return f"{base}?prefix={unique('p')}"
    # The stalled member may hold a full buffer (prefetch) as long as the run lasts
    # (ack_wait): it pauses; the server must not take its events back meanwhile.
    return f"{base}?stream={unique('S')}&prefetch={BUFFER}&ack_wait=3600"


@pytest.mark.soak
@pytest.mark.timeout(max(150, EVENTS // 500))
async def test_stalled_subscriber_costs_the_fast_one_nothing(
    soak_url: str, request: pytest.FixtureRequest, figures: Callable[[str], None]
) -> None:
    name = request.node.callspec.id
    durable = "durable" in name
    publisher = await alkpubsub.connect(soak_url)
    subscriber = await alkpubsub.connect(soak_url)

    def subscribe(topic: str, buffer: int) -> alkpubsub.Subscription:
        consumer = unique("c") if durable else None
        return subscriber.subscribe(topic, consumer=consumer, buffer=buffer)

    stalled = subscribe("soak:load", BUFFER)
    fast = {topic: subscribe(topic, 4 * CHUNK) for topic in ("soak:solo", "soak:load")}
    for sub in (stalled, *fast.values()):
        await sub.start()
    got = {"soak:solo": 0, "soak:load": 0}
    chunk_end: asyncio.Future[None] | None = None
    want_last: tuple[str, int] = ("", -1)

    async def read_fast(sub: alkpubsub.Subscription) -> None:
        async for event in sub:
            await sub.ack(event)
            got[event.topic] += 1
            if (
                (event.topic, event.payload["n"]) == want_last
                and chunk_end
                and not chunk_end.done()
            ):
                chunk_end.set_result(None)

    peak = baseline = rss()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss())
            await asyncio.sleep(0.1)

    readers = [asyncio.create_task(read_fast(sub)) for sub in fast.values()]
    sampler = asyncio.create_task(sample())
    elapsed = {"soak:solo": 0.0, "soak:load": 0.0}
    sent = {"soak:solo": 0, "soak:load": 0}
    walls: list[float] = []  # seconds per chunk, in order
    cpus: list[float] = []  # CPU seconds of this process (every thread) per chunk
    try:
        for k in range(EVENTS // CHUNK):
            topic = ORDER[k % 4]
            first = sent[topic]
            chunk_end = asyncio.get_running_loop().create_future()
            want_last = (topic, first + CHUNK - 1)
            started, cpu = time.perf_counter(), time.process_time()
            for n in range(first, first + CHUNK, BATCH):
                await publisher.publish_many([(topic, payload(i)) for i in range(n, n + BATCH)])
                await asyncio.sleep(0)  # let the readers run even where publishing never waits
            await asyncio.wait_for(chunk_end, 60)
            walls.append(time.perf_counter() - started)
            cpus.append(time.process_time() - cpu)
            elapsed[topic] += walls[-1]
            sent[topic] += CHUNK
        taken = await _until(lambda: _taken(stalled, sent["soak:load"], durable), 30)
        assert taken, (
            f"the stalled subscriber took in {stalled.buffered} buffered + "
            f"{stalled.stats.dropped} dropped of {sent['soak:load']} within 30 s"
        )
        peak = max(peak, rss())
    finally:
        for task in (sampler, *readers):
            task.cancel()
    solo, load = (sent[t] / elapsed[t] for t in ("soak:solo", "soak:load"))
    wall_ratio, cpu_ratio = pair_ratio(walls), pair_ratio(cpus)
    dropped, lag, held = stalled.stats.dropped, stalled.stats.lag, stalled.buffered
    bound = rss_bound(baseline, event_size())
    drained = await _drain(stalled, sent["soak:load"] if durable else held)
    await subscriber.close()
    await publisher.close()
    expected_dropped = 0 if durable else sent["soak:load"] - BUFFER
    figures(
        f"RELIABILITY {name} soak: events={EVENTS} fast solo={solo:,.0f}/s "
        f"with_stalled={load:,.0f}/s, per chunk pair {(wall_ratio - 1) * 100:+.1f}% wall "
        f"{(cpu_ratio - 1) * 100:+.1f}% cpu (bound -{TOLERANCE:.0%}) "
        f"stalled dropped={dropped} (expected {expected_dropped}) buffered={held} "
        f"lag={lag} behind={sent['soak:load'] - held - (0 if durable else dropped)} "
        f"rss baseline={baseline >> 20}MB peak={peak >> 20}MB bound={bound >> 20}MB"
    )
    fast_dropped = sum(sub.stats.dropped for sub in fast.values())
    assert got == sent and fast_dropped == 0, f"fast subscriber got {got} of {sent}"
    assert wall_ratio >= 1 - TOLERANCE, (
        f"the fast subscriber's rate next to the stalled one is {(wall_ratio - 1) * 100:+.1f}% "
        f"of its rate alone (median over chunk pairs; bound -{TOLERANCE:.0%})"
    )
    assert dropped == expected_dropped and held == BUFFER, (
        f"stalled: dropped {dropped}, held {held}"
    )
    tail = range(0, sent["soak:load"]) if durable else range(expected_dropped, sent["soak:load"])
    assert drained == list(tail), (
        f"the stalled subscriber read {len(drained)} events, not {len(tail)} in order"
    )
    assert peak <= bound, f"RSS peaked at {peak >> 20} MB, over the bound of {bound >> 20} MB"


def pair_ratio(costs: list[float]) -> float:
    """Median over adjacent (solo, load) chunk pairs of solo cost / load cost, that
    is, the fast subscriber's rate next to the stalled one relative to its rate
    alone. The first pair (connections and caches warming up) is left out;
    chunks run solo, load, load, solo, ... so a drift in machine load favours
    neither side, and the median ignores pairs another process disturbed."""
    ratios = []
    for k in range(2, len(costs) - 1, 2):
        a, b = costs[k], costs[k + 1]
        solo, load = (a, b) if ORDER[k % 4] == "soak:solo" else (b, a)
        ratios.append(solo / load)
    return statistics.median(ratios)


async def _until(check: Callable[[], bool], within: float) -> bool:
    """Poll ``check`` for up to ``within`` seconds; whether it came true."""
    deadline = time.monotonic() + within
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)


def _taken(stalled: alkpubsub.Subscription, load: int, durable: bool) -> bool:
    """Whether the stalled subscriber took in all it will: every load event
    (ephemeral: kept or dropped), or a full buffer (durable: paused)."""
    if durable:
        return stalled.buffered >= BUFFER
    return stalled.buffered + stalled.stats.dropped >= load


async def _drain(stalled: alkpubsub.Subscription, count: int) -> list[int]:
    """Read ``count`` events from the stalled subscriber (fewer if it runs dry)."""
    numbers: list[int] = []
    while len(numbers) < count:
        try:
            event = await stalled.get(timeout=10)
        except TimeoutError:
            break
        await stalled.ack(event)
        numbers.append(event.payload["n"])
    return numbers
