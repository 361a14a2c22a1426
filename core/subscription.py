"""Subscriptions: the bounded buffer between a transport's reader and the application.

Users get a :class:`Subscription` from ``transport.subscribe(...)`` and iterate
it. Transport authors subclass it; what they implement and may call is the
public part of the extension contract (see ``conformance/README.md``):

- hooks to implement: :meth:`Subscription.on_start` (become live: register with
  the broker, start readers; return only once live) and
  :meth:`Subscription.on_close` (stop readers, unregister);
- delivery, called on the event loop's thread: :meth:`Subscription.push` (a
  live event; a full buffer drops the oldest), :meth:`Subscription.put` (a
  durable event; a full buffer waits, nothing is lost), :meth:`Subscription.fail`
  (the iterator raises after the buffered events) and :meth:`Subscription.finish`
  (iteration ends after them);
- state: :attr:`Subscription.started`, :attr:`Subscription.closed`,
  :attr:`Subscription.buffered`, :attr:`Subscription.stats`.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Container
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, Literal, Self

from .capabilities import Start
from .errors import Closed
from .event import Event
from .topics import Pattern, compile_pattern

if TYPE_CHECKING:
    from .transport import BaseTransport

DEFAULT_BUFFER = 1024
"""Events a subscription buffers by default."""


@dataclass(slots=True)
class SubscriptionStats:
    """Counters of one subscription. ``lag`` is events known to be waiting
    (in the buffer, or in the durable log past the consumer), when known."""

    delivered: int = 0
    acked: int = 0
    nacked: int = 0
    dropped: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    malformed: int = 0
    reconnects: int = 0
    lag: int | None = 0
    offline_ms: int = 0
    """Milliseconds the subscription was not live after it started (reconnects):
    ephemeral transports lose what was published then, durable ones deliver it late."""

    def as_dict(self) -> dict[str, int | None]:
        """A plain dict, for logs and the CLI."""
        return asdict(self)


class Subscription:
    """An async iterator of events for one pattern.

    Use ``async with transport.subscribe(...) as sub:`` (``__aenter__`` returns
    once the subscription is live), then ``async for event in sub``. Transports
    subclass it and fill the buffer with :meth:`push` (live events; overflow
    drops the oldest) or :meth:`put` (durable events; a full buffer pauses the
    reader instead of losing anything).
    """

    overflow: ClassVar[Literal["drop_oldest", "pause"]] = "drop_oldest"
    """What a full buffer does: drop the oldest live event (counted in
    ``stats.dropped``), or pause reading until there is room (durable readers:
    nothing is lost). Subclasses that fill the buffer with :meth:`put` say "pause"."""

    def __init__(
        self,
        transport: BaseTransport,
        pattern: str,
        *,
        consumer: str | None = None,
        start: Start = "new",
        buffer: int = DEFAULT_BUFFER,
    ) -> None:
        self.transport = transport
        self.pattern: Pattern = compile_pattern(pattern)
        self.consumer = consumer
        self.start_at: Start = start
        self.buffer_size = buffer
        self.stats = SubscriptionStats()
        self._buffer: collections.deque[Event] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._started = False
        self._closed = False
        self._sink: Callable[[Event], None] | None = None
        self._on_error: Callable[[BaseException], None] | None = None
        self.skip_origin: str | None = None
        """Events of this ``origin`` are not wanted here: a transport may drop
        them as early as it can, before decoding them (the composite sets it on
        its targets' subscriptions to its own origin: those are echoes)..."""
        self.keep_ids: Container[str] = ()
        """...except those with these ids (the composite's publishes whose
        outcome it does not know: if a target stored one, it is delivered)."""

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Make the subscription live. Idempotent; iteration calls it too."""
        if self._closed:
            raise Closed(f"subscription to {self.pattern.text!r} is closed; subscribe again")
        if not self._started:
            self._started = True
            try:
                await self.on_start()
            except BaseException:
                self._closed = True
                self.transport.forget(self)
                raise

    async def close(self) -> None:
        """End iteration. Durable progress (acked events) is kept; unacked
        events are delivered again to the consumer later."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._wake_space()
        self.transport.forget(self)
        try:
            await self.on_close()
        finally:
            self._buffer.clear()

    @property
    def started(self) -> bool:
        """True once :meth:`start` began (``__aenter__`` or the first iteration):
        a transport delivers only to started subscriptions."""
        return self._started

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran or the transport closed."""
        return self._closed

    async def on_start(self) -> None:
        """Transport hook: become live (register with the broker, start readers).
        Return only once an event published afterwards will be delivered."""

    async def on_close(self) -> None:
        """Transport hook: stop readers, unregister."""

    # -- iteration ---------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        if not self._started:
            await self.start()
        while True:
            if self._buffer:
                event = self._buffer.popleft()
                self.stats.delivered += 1
                if self._space is not None:
                    self._wake_space()
                return event
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def get(self, timeout: float | None = None) -> Event:
        """The next event, waiting at most ``timeout`` seconds (``TimeoutError``)."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    # -- acknowledgement (durable transports override) ---------------------

    async def ack(self, event: Event) -> None:
        """Mark ``event`` processed. A no-op on ephemeral transports."""
        self.stats.acked += 1

    async def nack(self, event: Event, *, delay: float = 0, reason: str | None = None) -> None:
        """Ask for ``event`` to be delivered again after ``delay`` seconds.
        ``reason`` says why; once the event has used up ``max_deliveries`` it
        is the dead letter's ``x-dead-reason``. Ephemeral transports cannot
        redeliver; there it only counts."""
        self.stats.nacked += 1

    # -- handing events on without a buffer ---------------------------------

    def deliver_to(
        self,
        sink: Callable[[Event], None],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Hand every event to ``sink`` as it arrives instead of buffering it,
        and a failure to ``on_error``: for code that merges subscriptions (the
        composite), so an event reaches the merged buffer without a task hop.
        Call it before the subscription starts; ``sink`` runs on the event
        loop, must not block, and never applies backpressure (a durable reader
        feeding it does not pause)."""
        self._sink = sink
        self._on_error = on_error

    # -- filling the buffer: called by transports, on the event loop's thread --

    def push(self, event: Event) -> None:
        """Add a live event; when the buffer is full, drop the oldest."""
        if self._closed:
            return
        sink = self._sink
        if sink is not None:
            self.stats.delivered += 1
            sink(event)
            return
        buf = self._buffer
        if len(buf) >= self.buffer_size:
            buf.popleft()
            self.stats.dropped += 1
        buf.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def put(self, event: Event) -> bool:
        """Add a durable event, waiting while the buffer is full. False if closed."""
        while len(self._buffer) >= self.buffer_size and not self._closed:
            self._space = asyncio.get_running_loop().create_future()
            try:
                await self._space
            finally:
                self._space = None
        if self._closed:
            return False
        sink = self._sink
        if sink is not None:
            self.stats.delivered += 1
            sink(event)
            return True
        self._buffer.append(event)
        self._wake()
        return True

    def fail(self, error: BaseException) -> None:
        """Make the iterator raise ``error`` once the buffered events are consumed."""
        if self._on_error is not None:
            self._on_error(error)
            return
        self._error = error
        self._wake()

    def finish(self) -> None:
        """End iteration after the buffered events (transport closed underneath)."""
        self._closed = True
        self._wake()
        self._wake_space()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_space(self) -> None:
        space = self._space
        if space is not None and not space.done():
            space.set_result(None)

    @property
    def buffered(self) -> int:
        """Events waiting in this subscription's buffer."""
        return len(self._buffer)

    def __repr__(self) -> str:
        consumer = f" consumer={self.consumer!r}" if self.consumer else ""
        state = "closed" if self._closed else "live" if self._started else "new"
        return (
            f"<{type(self).__name__} {self.pattern.text!r}{consumer} {state} on "
            f"{self.transport.name}>"
        )
