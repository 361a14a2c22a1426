"""Outbox relay: carry committed events from a durable source to a broker.

The relay is a durable consumer of the source (normally
``honker+durable:///app.db``, consumer ``outbox-relay``). It reads up to
``batch`` events (whatever is buffered once the first arrives; it never waits
to fill a batch), forwards them unchanged (same ``id`` and ``origin``) in one
pipelined batch with :meth:`~alkpubsub.abilities.BatchForwarding.forward_many`,
and acks at the source, in order, each event the target confirmed, including
those it reports as ``duplicate`` (already stored: JetStream ``Nats-Msg-Id``,
the Redis transports' dedupe window). So it delivers at least once, and
subscribers on other nodes see each event once where the target deduplicates.

- **Refused** events (the target can never take them, e.g. over its size
  limit) are nacked with the reason; the source dead-letters them after its
  ``max_deliveries``. The rest of the batch goes on.
- **Target down**: a batch whose forward fails (``ConnectionLost``,
  ``PublishError``, any other :class:`~alkpubsub.PubSubError`) is tried again,
  whole and in order, after ``retry_delay`` seconds doubling to
  ``max_retry_delay``; nothing is skipped or reordered, nothing is acked
  before the target confirmed it.
- **One active relay** per source file and consumer name: the source's
  consumer lease refuses a second one with ``ConsumerBusy``; that relay stands
  by, tries again every ``standby_poll`` seconds and takes over once the name
  is free (at once after the active one stopped or died on this host; after
  the source's ``consumer_ttl`` for another host).
- **Stop**: when ``stop`` is set, the relay stops reading, finishes the batch
  in flight (acks what the target confirmed; a batch the target does not
  confirm within ``drain_timeout`` seconds stays unacked and is forwarded
  again by the next relay), closes the subscription (which saves the
  position) and returns.

Counters are in ``relay.stats`` (:class:`RelayStats`) and, for a Honker
source, in ``<db>.relay-<consumer>.json`` beside the database, rewritten about
every ``stats_interval`` seconds for ``alkpubsub stats`` (see
:mod:`alkpubsub.storage.relay_stats` for why a file).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from alkpubsub.abilities import BatchForwarding, Forwarded
from alkpubsub.capabilities import Start
from alkpubsub.config import redact_url
from alkpubsub.errors import ConfigError, ConnectionLost, ConsumerBusy
from alkpubsub.event import Event
from alkpubsub.subscription import DEFAULT_BUFFER, Subscription
from alkpubsub.transport import Transport

from .relay_forward import BatchForwarder
from .relay_stats import RelayStats, StatsFile, consumer_lag, stats_path
from .store import Store

__all__ = ["OutboxRelay", "RelayStats"]

log = logging.getLogger("alkpubsub.relay")

StateCallback = Callable[[bool, str], None]
"""Called with ``(active, detail)`` when the relay becomes active or stands by."""


@runtime_checkable
class StoreBacked(Protocol):
    """A source that lives in a Honker file (the stats file goes beside it)."""

    async def open_store(self) -> Store: ...


class OutboxRelay:
    """Forward events matching ``pattern`` from ``source`` to ``target`` in batches."""

    def __init__(
        self,
        source: Transport,
        target: Transport,
        *,
        pattern: str = ">",
        consumer: str = "outbox-relay",
        start: Start = "earliest",
        batch: int = 256,
        retry_delay: float = 0.1,
        max_retry_delay: float = 2.0,
        standby_poll: float = 0.5,
        stats_interval: float = 1.0,
        stats_file: bool = True,
        drain_timeout: float = 5.0,
        on_state: StateCallback | None = None,
    ) -> None:
        if not source.capabilities.consumer_offsets:
            raise ConfigError(
                f"relay source {source.name} is not durable; use a honker+durable:// URL "
                "so the relay can resume where it stopped"
            )
        if not isinstance(target, BatchForwarding):
            raise ConfigError(f"relay target {target.name} cannot forward events unchanged")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ConfigError(f"batch={batch!r} must be a positive int (events)")
        self.source = source
        self.target = target
        self.pattern = pattern
        self.consumer = consumer
        self.start = start
        self.batch = batch
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.standby_poll = standby_poll
        self.stats_interval = stats_interval
        self.drain_timeout = drain_timeout
        self.stats = RelayStats()
        self.stats_path: Path | None = None
        """Where the counters are written (set once the source's file is known)."""
        self._stats_file = stats_file
        self._on_state = on_state
        self._position = 0  # the source offset of the last event acked
        self._stop: asyncio.Event = asyncio.Event()
        self._stopper: asyncio.Task[bool] | None = None
        self._forwarder: BatchForwarder
        self._file: StatsFile | None = None

    @property
    def active(self) -> bool:
        """True while this relay holds the consumer name and forwards."""
        return self.stats.active

    @property
    def handled(self) -> int:
        """Events confirmed at the target and acked at the source (new or duplicate)."""
        return self.stats.forwarded + self.stats.duplicates

    # -- running -------------------------------------------------------------

    async def run(self, *, stop: asyncio.Event | None = None, limit: int | None = None) -> None:
        """Relay until ``stop`` is set (in-flight work is finished first),
        ``limit`` events were handled, or the task is cancelled."""
        self._stop = stop = stop or asyncio.Event()
        self._stopper = asyncio.create_task(stop.wait(), name="alkpubsub-relay-stop")
        target = self.target
        assert isinstance(target, BatchForwarding)  # checked in __init__
        self._forwarder = BatchForwarder(
            target,
            name=redact_url(self.target.name),
            consumer=self.consumer,
            stats=self.stats,
            stopped=self._stopper,
            retry_delay=self.retry_delay,
            max_retry_delay=self.max_retry_delay,
            drain_timeout=self.drain_timeout,
        )
        if self._stats_file and isinstance(self.source, StoreBacked):
            store = await self.source.open_store()
            self.stats_path = stats_path(store.path, self.consumer)
            self._file = StatsFile(
                self.stats_path,
                consumer=self.consumer,
                pattern=self.pattern,
                source=redact_url(self.source.name),
                target=redact_url(self.target.name),
            )
        reporter = asyncio.create_task(self._report_loop(), name="alkpubsub-relay-stats")
        try:
            while not self._finished(limit):
                sub = await self._claim()
                if sub is None:
                    break
                try:
                    ended = await self._pump(sub, limit)
                except (ConsumerBusy, ConnectionLost) as exc:
                    # Lost the lease (or the reader stopped): stand by and claim again.
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("relay %s: source subscription failed (%s)", self.consumer, exc)
                    ended = False
                finally:
                    await self._report()
                    await sub.close()  # saves the position
                    self._set_active(False, "inactive: consumer released")
                    if self._file is not None:
                        self._file.write_final(self.stats, position=self._position)
                if ended:
                    break
                await self._forwarder.sleep(self.standby_poll)  # no hot loop on a failing source
        finally:
            reporter.cancel()
            self._stopper.cancel()
            await asyncio.gather(reporter, self._stopper, return_exceptions=True)
            if self._file is not None and self._file.path.exists():
                self._file.write_final(self.stats, position=self._position)

    def _finished(self, limit: int | None) -> bool:
        return self._stop.is_set() or (limit is not None and self.handled >= limit)

    async def _claim(self) -> Subscription | None:
        """Subscribe as the consumer, standing by while another relay holds it."""
        announced = False
        buffer = max(DEFAULT_BUFFER, 4 * self.batch)
        while not self._stop.is_set():
            sub = self.source.subscribe(
                self.pattern, consumer=self.consumer, start=self.start, buffer=buffer
            )
            try:
                await sub.start()
            except ConsumerBusy as exc:
                if not announced:
                    announced = True
                    log.info("relay %s: standby (%s)", self.consumer, exc)
                    self._set_active(
                        False, f"standby: {exc} (trying again every {self.standby_poll:g} s)"
                    )
                await self._forwarder.sleep(self.standby_poll)
                continue
            self._set_active(True, f"active: consumer {self.consumer!r} claimed")
            return sub
        return None

    def _set_active(self, active: bool, detail: str) -> None:
        was, self.stats.active = self.stats.active, active
        if active != was or (not active and detail.startswith("standby")):
            if active:
                log.info("relay %s: active", self.consumer)
            if self._on_state is not None:
                self._on_state(active, detail)

    async def _pump(self, sub: Subscription, limit: int | None) -> bool:
        """Forward batches until stopped (True) or the subscription ended (True)."""
        while not self._finished(limit):
            cap = self.batch if limit is None else min(self.batch, limit - self.handled)
            batch = await self._read(sub, cap)
            if batch is None:
                return True  # the source closed underneath
            if not batch:
                continue  # stopped while waiting: the loop condition ends it
            results = await self._forwarder.forward(batch)
            await self._settle(sub, batch, results)
        return True

    async def _read(self, sub: Subscription, cap: int) -> list[Event] | None:
        """Up to ``cap`` events: wait for the first, then take what is buffered.
        ``[]`` when stopped while waiting, None when the subscription ended."""
        if not sub.buffered:
            stopper = self._stopper
            assert stopper is not None
            getter = asyncio.create_task(_next(sub))
            await asyncio.wait((getter, stopper), return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                await asyncio.gather(getter, return_exceptions=True)
                if getter.cancelled() or getter.exception() is not None:
                    return []
                # Else it arrived as we cancelled: forward it with what follows.
            first = getter.result()
            if first is None:
                return None
            batch = [first]
        else:
            batch = []
        while len(batch) < cap and sub.buffered:
            batch.append(await sub.__anext__())
        return batch

    async def _settle(
        self, sub: Subscription, batch: Sequence[Event], results: Sequence[Forwarded]
    ) -> None:
        """Ack what the target confirmed, nack what it refused; the events past
        ``results`` (stopped before the target confirmed them) stay unacked."""
        stats = self.stats
        for event, result in zip(batch, results, strict=False):
            refused = result.refused
            if refused is not None:
                stats.refused += 1
                log.error(
                    "relay %s: %s refused %s for good (%s)",
                    self.consumer,
                    self.target.name,
                    event.id,
                    refused,
                )
                await sub.nack(event, reason=f"{self.target.name} refused it: {refused}")
                continue
            await sub.ack(event)
            if result.duplicate:
                stats.duplicates += 1
            else:
                stats.forwarded += 1
            if event.offset is not None:
                self._position = event.offset
        if len(results) == len(batch):
            stats.batches += 1
        # Events past ``results`` stay unacked: the position never passes them,
        # so the next relay on this consumer forwards them again.

    # -- statistics ------------------------------------------------------------

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.stats_interval)
            await self._report()

    async def _report(self) -> None:
        """Refresh ``stats.lag`` and, while active, rewrite the stats file."""
        if self.stats.active:
            lag = await consumer_lag(self.source, self.consumer, self._position)
            if lag is not None:
                self.stats.lag = lag
            if self._file is not None:
                self._file.write(self.stats, position=self._position)


async def _next(sub: Subscription) -> Event | None:
    """The next event, or None when the subscription ended."""
    try:
        return await sub.__anext__()
    except StopAsyncIteration:
        return None
