"""What one measurement returns, and the timing loops every case shares.

A measure is ``async def measure(n) -> Sample``: it sets up (outside the clock),
times the hot part only, tears down, and checks that the work really happened
(every event received, nothing dropped), raising :class:`BenchError` otherwise,
so that a broken path can never show up as a fast one.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

clock = time.perf_counter
"""The clock for every interval. On Linux it is CLOCK_MONOTONIC, shared by all
processes, so a timestamp taken in a child process compares with ours."""


class BenchError(RuntimeError):
    """A measurement did not do the work it claims (lost events, bad payload...)."""


class Unavailable(Exception):
    """What a row needs is missing here (a module, a broker binary)."""


@dataclass(frozen=True, slots=True)
class Throughput:
    """``events`` moved in ``seconds``."""

    events: int
    seconds: float

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.events / self.seconds if self.seconds > 0 else math.inf


@dataclass(frozen=True, slots=True)
class Latency:
    """One round trip per sample, in seconds."""

    samples: tuple[float, ...]

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100), nearest-rank, in seconds."""
        ordered = sorted(self.samples)
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class CpuLoad:
    """CPU time a process used over ``wall_seconds`` of wall-clock time."""

    cpu_seconds: float
    wall_seconds: float

    @property
    def fraction(self) -> float:
        """CPU seconds per wall-clock second (1.0 = one core busy)."""
        return self.cpu_seconds / self.wall_seconds


Sample = Throughput | Latency | CpuLoad
Measure = Callable[[int], Awaitable[Sample]]


def median(values: list[float]) -> float:
    """The median; the figure reported for repeated runs."""
    return statistics.median(values)


async def transfer(
    n: int,
    publish: Callable[[int], Awaitable[None]],
    receive: Callable[[int], Coroutine[Any, Any, None]],
) -> Throughput:
    """Time ``publish(n)`` in one task against ``receive(n)`` in another.

    The receiver must already be subscribed. The clock runs from the first
    publish until the receiver has taken the ``n``-th event.
    """
    receiver = asyncio.create_task(receive(n))
    await asyncio.sleep(0)  # let the receiver reach its first wait
    start = clock()
    try:
        await publish(n)
        await receiver
    finally:
        receiver.cancel()
    return Throughput(n, clock() - start)


async def round_trips(n: int, round_trip: Callable[[int], Awaitable[None]]) -> Latency:
    """Time ``round_trip(i)`` (publish one, await its receipt) ``n`` times."""
    samples: list[float] = []
    append = samples.append
    for i in range(n):
        start = clock()
        await round_trip(i)
        append(clock() - start)
    return Latency(tuple(samples))


def payload(i: int) -> dict[str, object]:
    """The small dict every row publishes (same on both sides of a row)."""
    return {"seq": i, "name": "bench", "value": 3.25, "tags": ["a", "b"], "ok": True}


def check_seq(received: object, expected: int) -> None:
    """Raise :class:`BenchError` unless ``received`` is the payload number ``expected``."""
    seq = received.get("seq") if isinstance(received, dict) else None
    if seq != expected:
        raise BenchError(f"expected event seq={expected}, received {received!r}")


class Handoff:
    """Hands received payloads from a subscriber (task or callback) to the
    timing loop: one event in flight, each round trip checked by its ``seq``.

    Start the subscriber first (calling :meth:`deliver` per message), then
    ``await handoff.round_trips(n, publish)``.
    """

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None
        self._expected = -1

    def deliver(self, received: object) -> None:
        """Called by the subscriber with each decoded payload."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # a warm-up leftover or a duplicate: not the awaited event
        try:
            check_seq(received, self._expected)
        except BenchError as exc:
            waiter.set_exception(exc)
        else:
            waiter.set_result(None)

    async def round_trips(
        self, n: int, publish: Callable[[int], Awaitable[None]], *, lost_after: float = 10.0
    ) -> Latency:
        """Publish ``seq`` 0..n-1 one at a time; time each until it is delivered.

        No timer per round trip (it would cost microseconds on both sides): a
        watchdog checks once a second and fails the run when one event has been
        awaited for ``lost_after`` seconds."""
        loop = asyncio.get_running_loop()

        async def round_trip(i: int) -> None:
            self._expected = i
            self._waiter = waiter = loop.create_future()
            await publish(i)
            await waiter

        async def watchdog() -> None:
            seen, since = -1, loop.time()
            while True:
                await asyncio.sleep(1)
                waiter = self._waiter
                if self._expected != seen:
                    seen, since = self._expected, loop.time()
                elif waiter is not None and not waiter.done() and loop.time() - since >= lost_after:
                    lost = BenchError(f"event seq={seen} not delivered within {lost_after:g} s")
                    waiter.set_exception(lost)

        guard = asyncio.create_task(watchdog())
        try:
            return await round_trips(n, round_trip)
        finally:
            guard.cancel()
            self._waiter = None
