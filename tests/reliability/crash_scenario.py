"""The durable crash scenario: kill the consumer, the publisher and the broker
while 10,000 events flow, then account for every event.

One consumer process (``child_consumer.py``) records and acks each event; one
publisher process (``child_publisher.py``) publishes in batches. While they run
the test SIGKILLs and restarts, at random points (seeded, the seed is printed):

* the consumer, three times (at 10-25 %, 40-55 % and 70-85 % of the events processed);
* the publisher, once, while a ``publish_many`` call is in flight (45-55 % published);
* the broker, twice (SIGKILL, then start on the same port and data; 25-35 % and
  60-70 % published). A Honker database has no broker: the file is the broker,
  so there every process holding it (consumer and publisher) is killed at once.

Then: every event a ``publish_many`` returned was processed at least once
(``lost``); events from calls that never returned may exist, but only whole
and only from such calls; an event processed twice (``dup``) was first
processed within ``WINDOW`` seconds before a crash, or between a crash and the
first delivery after it (an ack in flight when a process died); and delivery
resumed after every restart (``first_delivery_after_restart``, measured).
:mod:`crash_analysis` does the accounting.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path
from typing import Protocol

from crash_analysis import Crash, Ledger, Outcome
from crash_children import WAIT, Child, Children

EVENTS = 10_000
BATCH = 50
PACE = 0.005
"""Seconds between batches: publishing takes ~10 s, long enough to span every kill."""
BUFFER = 100
"""The consumer's buffer: events delivered ahead of processing (lost with a killed
consumer, redelivered to the next one, never counted as processed)."""
SETTLE = 3.0
"""Seconds without a delivery before the last consumer closes: above the test
URLs' ack_wait (2 s) and Redis claim_idle (1 s), so late redeliveries land."""
SETTLE_WITHIN = 20.0
"""Upper bound on that wait."""
RUN_WITHIN = 150.0
"""Seconds the whole run may take before the test fails (it takes ~20-30 s)."""


class Broker(Protocol):
    """A broker the scenario can crash: ``tests/brokers.py`` servers."""

    def kill(self) -> None: ...

    def start(self) -> object: ...


class CrashScenario:
    """One run against one durable URL; :meth:`run` returns the accounting."""

    def __init__(
        self,
        url: str,
        broker: Broker | None,
        workdir: Path,
        seed: int,
        events: int = EVENTS,
    ) -> None:
        self.url = url
        self.broker = broker
        self.workdir = workdir
        self.seed = seed
        self.events = events
        self.topic = f"crash:t{seed}"
        self.consumer_name = f"crash-{seed}"
        rng = random.Random(seed)
        # (counter, threshold, action): counters are events processed / accepted.
        plan = [("processed", rng.uniform(lo, lo + 0.15), "consumer") for lo in (0.10, 0.40, 0.70)]
        plan += [("accepted", rng.uniform(lo, lo + 0.10), "broker") for lo in (0.25, 0.60)]
        self.plan = sorted(plan, key=lambda step: step[1])
        self.die_at: int | None = int(rng.uniform(0.45, 0.55) * events)
        self.die_delay = rng.uniform(0.0, 0.004)
        self.ledger = Ledger()
        self.crashes: list[Crash] = []
        self._consumers = 0
        self._publishers = 0

    async def run(self, children: Children) -> Outcome:
        """Run the scenario with processes from ``children``; account for it."""
        consumer = await self._start_consumer(children)
        publisher = self._start_publisher(children, 0)
        deadline = time.monotonic() + RUN_WITHIN
        plan = list(self.plan)
        while True:
            self._poll(consumer, publisher)
            if not consumer.running:
                raise AssertionError(f"{consumer.name} exited: {consumer.log_tail()}")
            if not publisher.running and not self.ledger.published_all:
                publisher = self._publisher_died(children, publisher)
            if plan:
                counter, share, action = plan[0]
                have = len(
                    self.ledger.processed if counter == "processed" else self.ledger.accepted
                )
                if have >= share * self.events:
                    plan.pop(0)
                    consumer, publisher = await self._crash(action, children, consumer, publisher)
                    continue
            if not plan and self.ledger.published_all and self.ledger.all_processed():
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not done within {RUN_WITHIN} s: {self.ledger.progress()}; steps left "
                    f"{plan}; consumer log:\n{consumer.log_tail()}"
                )
            await asyncio.sleep(0.02)
        await self._settle(consumer, publisher)
        code = consumer.stop()
        self._poll(consumer, publisher)
        assert code == 0, f"the last consumer did not close cleanly ({code}): {consumer.log_tail()}"
        kinds = sorted(crash.what for crash in self.crashes)
        broker = "broker" if self.broker is not None else "file"
        assert kinds == sorted(["consumer"] * 3 + [broker] * 2 + ["publisher"]), (
            f"the run ended after the crashes {kinds} only"
        )
        return self.ledger.outcome(self.crashes)

    # -- processes ----------------------------------------------------------

    async def _start_consumer(self, children: Children) -> Child:
        name = f"consumer-{self._consumers}"
        self._consumers += 1
        child = children.start(
            name, "child_consumer.py", self.url, self.topic, self.consumer_name, str(BUFFER)
        )
        deadline = time.monotonic() + WAIT
        while not self._ready(child):
            if not child.running or time.monotonic() > deadline:
                child.kill()
                raise AssertionError(f"{name} not ready within {WAIT} s: {child.log_tail()}")
            await asyncio.sleep(0.02)
        return child

    def _ready(self, child: Child) -> bool:
        for words in child.reader.new_lines():
            self.ledger.consumer_line(child.name, words)
        return self.ledger.is_ready(child.name)

    def _start_publisher(self, children: Children, first: int) -> Child:
        name = f"publisher-{self._publishers}"
        self._publishers += 1
        args = [self.url, self.topic, str(first), str(self.events - first), str(BATCH), str(PACE)]
        if self.die_at is not None:
            args += [str(self.die_at), f"{self.die_delay:.6f}"]
        return children.start(name, "child_publisher.py", *args)

    async def _settle(self, consumer: Child, publisher: Child) -> None:
        """Wait until no delivery has come for ``SETTLE`` s (at most ``SETTLE_WITHIN``).

        A broker SIGKILL can lose acks the server had not stored yet; JetStream
        delivers those events again once their ``ack_wait`` runs out, possibly
        after the last event was first processed. The live consumer takes them
        (counted as duplicates, held to the window); closing before would leave
        them for the next member, which is at-least-once, not a clean close."""

        def deliveries() -> int:
            return sum(len(times) for times in self.ledger.processed.values())

        seen, quiet_since = deliveries(), time.monotonic()
        give_up = quiet_since + SETTLE_WITHIN
        while time.monotonic() - quiet_since < SETTLE and time.monotonic() < give_up:
            await asyncio.sleep(0.1)
            self._poll(consumer, publisher)
            if (now := deliveries()) != seen:
                seen, quiet_since = now, time.monotonic()

    def _poll(self, consumer: Child, publisher: Child) -> None:
        for words in consumer.reader.new_lines():
            self.ledger.consumer_line(consumer.name, words)
        for words in publisher.reader.new_lines():
            self.ledger.publisher_line(publisher.name, words)

    def _publisher_died(self, children: Children, publisher: Child) -> Child:
        """The publisher exited before publishing everything: its planned SIGKILL."""
        for words in publisher.reader.new_lines():
            self.ledger.publisher_line(publisher.name, words)
        code = publisher.returncode
        if code != -9 or self.die_at is None:
            raise AssertionError(f"{publisher.name} exited with {code}: {publisher.log_tail()}")
        in_flight = self.ledger.in_flight(publisher.name)
        assert in_flight is not None, f"{publisher.name} died between calls, not mid-call"
        self.die_at = None
        killed = in_flight + self.die_delay
        new = self._start_publisher(children, self.ledger.next_to_publish())
        self.crashes.append(Crash("publisher", killed, new.started))
        return new

    async def _crash(
        self, action: str, children: Children, consumer: Child, publisher: Child
    ) -> tuple[Child, Child]:
        if action == "consumer":
            at = consumer.kill()
            self._poll(consumer, publisher)
            consumer = await self._start_consumer(children)
            self.crashes.append(Crash("consumer", at, consumer.started))
        elif self.broker is not None:
            at = time.monotonic()
            # Blocking on purpose: the children run on, and start() arms the
            # broker's parent-death signal only from the main thread.
            self.broker.kill()
            self.broker.start()
            self.crashes.append(Crash("broker", at, time.monotonic()))
        else:
            # Honker: the file is the broker; every process holding it dies at once.
            killed = [c for c in (consumer, publisher) if c.running]
            at = time.monotonic()
            for child in killed:
                child.proc.send_signal(signal.SIGKILL)
            for child in killed:
                child.kill()
            self._poll(consumer, publisher)
            consumer = await self._start_consumer(children)
            if publisher in killed and not self.ledger.published_all:
                first = self.ledger.next_to_publish()
                publisher = self._start_publisher(children, first)
            self.crashes.append(Crash("file", at, consumer.started))
        return consumer, publisher
