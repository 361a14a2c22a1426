"""What a durable subscription reading a log keeps about delivery: the offsets
delivered but not acked (its position is just before the oldest), how often
each was delivered, and the nacked events due again. Shared by
``honker+durable://`` and ``memory+durable://``."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from alkpubsub.deadletter import dead_letter, should_dead_letter
from alkpubsub.event import Event


class AckLedger:
    """Delivered offsets in order, their acks, and redeliveries (see the module
    docstring). ``wake`` is called when a nacked event becomes due."""

    __slots__ = ("_acked", "_deliveries", "_order", "_timers", "_wake", "ready", "stopped")

    def __init__(self, wake: Callable[[], None]) -> None:
        self._order: deque[int] = deque()  # unacked delivered offsets, oldest first
        self._acked: dict[int, bool] = {}  # offset -> acked, for those in _order
        self._deliveries: dict[int, int] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._wake = wake
        self.ready: deque[Event] = deque()
        """Nacked events due again, oldest first."""
        self.stopped = False

    def delivered(self, offset: int) -> None:
        """``offset`` was handed to the subscriber; it holds the position back until acked."""
        self._order.append(offset)
        self._acked[offset] = False

    def position(self, read: int) -> int:
        """The highest offset below which everything was acked or skipped, for a
        reader that has read up to ``read``."""
        return self._order[0] - 1 if self._order else read

    def unacked(self, offset: int) -> bool:
        return self._acked.get(offset) is False

    def settle(self, offset: int) -> bool:
        """``offset`` is done (acked, or dead-lettered); True if it was delivered
        and unacked, so the position may have moved."""
        self._deliveries.pop(offset, None)
        if self._acked.get(offset) is not False:
            return False
        self._acked[offset] = True
        order, acked = self._order, self._acked
        while order and acked[order[0]]:
            del acked[order.popleft()]
        return True

    def retry(self, event: Event, offset: int, delay: float, max_deliveries: int) -> int | None:
        """Schedule ``event`` again after ``delay``; or, once it has used up
        ``max_deliveries``, return how many times it was delivered (the caller
        dead-letters it). None if it is already waiting for its delay."""
        if offset in self._timers:
            return None
        deliveries = self._deliveries.get(offset, 1)
        if should_dead_letter(event.topic, deliveries, max_deliveries):
            return deliveries
        self._deliveries[offset] = deliveries + 1
        if delay > 0:
            self._timers[offset] = asyncio.get_running_loop().call_later(
                delay, self._due, event, offset
            )
        else:
            self._due(event, offset)
        return None

    def _due(self, event: Event, offset: int) -> None:
        self._timers.pop(offset, None)
        if not self.stopped:
            self.ready.append(event)
            self._wake()

    def stop(self) -> None:
        """The subscription closed: no more redeliveries."""
        self.stopped = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()


async def bury(
    event: Event,
    offset: int,
    *,
    deliveries: int,
    reason: str | None,
    origin: str,
    consumer: str | None,
    write: Callable[[Event, bytes], Awaitable[object]],
) -> None:
    """Write ``event``'s dead letter (see :mod:`alkpubsub.deadletter`) with ``write``."""
    letter, body = dead_letter(
        topic=event.topic,
        reason=reason or f"nacked after {deliveries} deliveries",
        origin=origin,
        event=event,
        deliveries=deliveries,
        consumer=consumer,
        offset=offset,
    )
    await write(letter, body)
