"""In-process durable transport: a log in memory, for application tests.

Features
    persistent: no (the log lives as long as the process)   replay: yes
    consumer offsets: yes   ordered: yes   wildcards: yes   dead letter: yes
    cross_process: no   competing consumers: no (a second live subscriber of
    one consumer name gets ConsumerBusy)
    What ``honker+durable://`` promises, minus surviving a restart: named
    consumers resume after their last ack, unacked events come again after
    close, ``nack`` redelivers (after ``delay``), events dead-letter to
    ``dead:<topic>`` after ``max_deliveries``, ``start`` is earliest / new / an
    offset. So tests of durable consumers need no file and no server: swap the
    production URL for ``memory+durable://``.

Connection String
    ``memory+durable://``       a private log for this transport
    ``memory+durable://NAME``   one log per NAME in this process, shared by
                                every transport opened with the same URL

Transport Options
    none (``max_deliveries`` from Settings)
"""

from __future__ import annotations

import asyncio
from typing import Any

from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.config import Settings, TransportOptions, parse_options, parse_url
from alkpubsub.errors import ConfigError, ConsumerBusy
from alkpubsub.event import Event
from alkpubsub.transport import BaseTransport, Subscription

from ._redelivery import AckLedger, bury


class _Log:
    """Events in commit order (offset = index + 1), and saved consumer positions."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.events: list[Event] = []
        self.saved: dict[str, int] = {}
        self.live: dict[str, Subscription] = {}
        self.readers: set[DurableMemorySubscription] = set()
        self.users = 0

    def append(self, event: Event) -> Event:
        placed = event.with_offset(len(self.events) + 1)
        self.events.append(placed)
        for reader in self.readers:
            reader.signal.set()
        return placed


_logs: dict[str, _Log] = {}


class DurableMemoryTransport(BaseTransport):
    """A durable log inside one process (see the module docstring)."""

    capabilities = Capabilities(
        replay=True, consumer_offsets=True, ordered=True, wildcards=True, dead_letter=True
    )

    def __init__(
        self, name: str | None = None, *, max_deliveries: int = 5, origin: str | None = None
    ) -> None:
        super().__init__(origin=origin)
        if max_deliveries < 1:
            raise ConfigError(f"max_deliveries={max_deliveries!r} must be at least 1")
        self.name = f"memory+durable://{name}" if name else "memory+durable://"
        self.max_deliveries = max_deliveries
        self.log = _Log(None) if name is None else _logs.setdefault(name, _Log(name))
        self.log.users += 1

    async def send(self, event: Event, body: bytes) -> Event:
        return self.log.append(event)

    async def send_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        return [self.log.append(event) for event, _ in batch]

    async def write_dead_letter(self, letter: Event, body: bytes) -> Event:
        return self.log.append(letter)

    def make_subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        return DurableMemorySubscription(
            self, pattern, consumer=consumer, start=start, buffer=buffer
        )

    async def disconnect(self) -> None:
        # A named log outlives its transports (as a broker's stream outlives its
        # clients): a consumer resumes in a transport opened later.
        self.log.users -= 1


def _start_position(log: _Log, start: Start) -> int:
    if start == "earliest":
        return 0
    if start == "new":
        return len(log.events)
    return max(0, int(start) - 1)  # an offset: that event is the first delivered


class DurableMemorySubscription(Subscription):
    """Reads the log from its own position; see the module docstring."""

    overflow = "pause"
    transport: DurableMemoryTransport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.signal = asyncio.Event()
        self._pos = 0
        self._ledger = AckLedger(self.signal.set)
        self._task: asyncio.Task[None] | None = None

    @property
    def position(self) -> int:
        """The highest offset below which everything was acked or skipped."""
        return self._ledger.position(self._pos)

    async def on_start(self) -> None:
        log = self.transport.log
        name = self.consumer
        if name is not None:
            if name in log.live:
                raise ConsumerBusy(
                    f"consumer {name!r} already has a live subscription on {self.transport.name}; "
                    "close it first, or use another name"
                )
            log.live[name] = self
            self._pos = log.saved.get(name, _start_position(log, self.start_at))
        else:
            self._pos = _start_position(log, self.start_at)
        log.readers.add(self)
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def on_close(self) -> None:
        log = self.transport.log
        self._ledger.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        log.readers.discard(self)
        if self.consumer is not None and log.live.get(self.consumer) is self:
            log.saved[self.consumer] = max(log.saved.get(self.consumer, 0), self.position)
            del log.live[self.consumer]

    async def _read(self) -> None:
        log = self.transport.log
        matches = self.pattern.matches
        track = self.consumer is not None
        ledger = self._ledger
        ready = ledger.ready
        while not self._closed:
            if ready:
                self.stats.redelivered += 1
                if not await self.put(ready.popleft()):
                    return
                continue
            self.signal.clear()
            if self._pos >= len(log.events):
                self.stats.lag = len(self._buffer)
                await self.signal.wait()
                continue
            event = log.events[self._pos]
            self._pos += 1
            if not matches(event.topic):
                continue
            offset = self._pos
            if track:
                ledger.delivered(offset)
            if not await self.put(event):
                return

    async def ack(self, event: Event) -> None:
        await super().ack(event)
        if event.offset is not None:
            self._done(event.offset)

    async def nack(self, event: Event, *, delay: float = 0, reason: str | None = None) -> None:
        await super().nack(event, delay=delay, reason=reason)
        offset = event.offset
        if offset is None or self._closed:
            return
        ledger = self._ledger
        if self.consumer is not None and not ledger.unacked(offset):
            return  # acked already, or not ours
        transport = self.transport
        deliveries = ledger.retry(event, offset, delay, transport.max_deliveries)
        if deliveries is not None:
            await bury(
                event,
                offset,
                deliveries=deliveries,
                reason=reason,
                origin=transport.origin,
                consumer=self.consumer,
                write=transport.write_dead_letter,
            )
            self.stats.dead_lettered += 1
            self._done(offset)

    def _done(self, offset: int) -> None:
        if self._ledger.settle(offset) and self.consumer is not None:
            saved = self.transport.log.saved
            saved[self.consumer] = max(saved.get(self.consumer, 0), self.position)


class _NoOptions(TransportOptions):
    pass


def from_url(url: str, settings: Settings | None = None) -> DurableMemoryTransport:
    """Build from ``memory+durable://`` or ``memory+durable://NAME``."""
    parsed = parse_url(url)
    parse_options(_NoOptions, parsed, settings)
    name = parsed.raw.split("://", 1)[1].split("?", 1)[0] if "://" in parsed.raw else ""
    return DurableMemoryTransport(
        name or None,
        max_deliveries=settings.max_deliveries if settings else 5,
        origin=settings.origin if settings else None,
    )
