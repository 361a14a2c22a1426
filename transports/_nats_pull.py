"""The JetStream subscription of ``nats+durable://``: a pull loop on one consumer.

One pull request is outstanding at a time, for no more events than the buffer
has room for, so a slow reader pauses the consumer instead of losing events
(and competing members get the rest). A member of a named consumer also holds
at most ``prefetch`` deliveries unacked (asked for, buffered, or handed out
and not acked), at most half the consumer's ``max_ack_pending``: the server
stops the whole consumer at that limit, so a member killed holding a full
buffer (1024, over the server's default of 1000) used to stall every other
member until ``ack_wait`` (measured 29.5 s with ack_wait=30). Now only its own
deliveries wait. A delivery held longer than ``ack_wait`` no longer counts (the
server has taken it back for redelivery).

Requests go straight to ``$JS.API.CONSUMER.MSG.NEXT`` with a reply inbox per
subscription, handled by a nats-py callback: that keeps closing exact (in-hand
events are naked back, none stay stranded in a client-side queue) and lets a
lost request be told apart from an idle one, which is how a vanished consumer
(nats.py #504, memory streams after a restart) is noticed and re-created.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from alkpubsub.capabilities import Start
from alkpubsub.deadletter import should_dead_letter
from alkpubsub.errors import ConnectionLost, PayloadError
from alkpubsub.event import Event
from alkpubsub.topics import is_dead_letter
from alkpubsub.transport import Subscription

from ._nats_common import to_topic
from ._nats_consumer import Consumer
from ._nats_dead import bury, bury_malformed
from ._nats_decode import adopt, decode

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as NatsSub

    from .nats_durable import NatsDurableTransport

_END_OF_REQUEST = {"404", "408", "409"}  # no messages / expired / consumer changed
_SLACK = 2.0  # seconds past a request's expiry before it counts as lost


class PullSubscription(Subscription):
    """Events of one JetStream consumer (named, or anonymous for ``consumer=None``)."""

    overflow = "pause"

    transport: NatsDurableTransport

    def __init__(
        self,
        transport: NatsDurableTransport,
        pattern: str,
        *,
        consumer: str | None,
        start: Start,
        buffer: int,
    ) -> None:
        super().__init__(transport, pattern, consumer=consumer, start=start, buffer=buffer)
        self.consumer_state = Consumer(
            transport.consumer_settings,
            consumer=consumer,
            pattern=pattern,
            filter_subject=transport.subject(pattern),
            start=start,
            log_once=transport.log_once,
        )
        self.durable = consumer is not None
        self.consumer_name = self.consumer_state.name
        # stream sequence -> (delivery, loop time received), in the order received
        self._unacked: dict[int, tuple[Msg, float]] = {}
        self._freed = asyncio.Event()  # an ack/nack made room below the hold limit
        self._inbox: NatsSub | None = None
        self._reply = ""
        self._task: asyncio.Task[None] | None = None
        self._request = 0
        self._remaining = 0
        self._answered = False
        self._request_done = asyncio.Event()
        self._heal = False

    # -- lifecycle -----------------------------------------------------------

    async def on_start(self) -> None:
        conn = self.transport._conn
        with conn.translate(f"opening consumer {self.consumer_name!r}"):
            await self.ensure_consumer()
            self._reply = conn.nc.new_inbox()
            self._inbox = await conn.nc.subscribe(self._reply + ".*", cb=self._on_message)
        self._task = asyncio.create_task(self._pull_loop(), name=f"alkpubsub pull {self!r}")

    async def on_close(self) -> None:
        await self._stop_loop()
        nc = self.transport._conn.client
        inbox, self._inbox = self._inbox, None
        if inbox is not None and nc is not None and nc.is_connected:
            # The callback sees the subscription closed and naks what is left.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(inbox.drain(), 2.0)  # type: ignore[no-untyped-call]
        if nc is not None and nc.is_connected:
            if self._unacked:
                # The server may still hold our last pull request although its
                # inbox is gone, and would hand the first nak'd event to it (lost
                # until ack_wait). Asking for the consumer's info makes nats-server
                # (2.9) drop requests nobody listens to any more.
                with contextlib.suppress(Exception):
                    await self.transport.js.consumer_info(self.transport.stream, self.consumer_name)
            for msg, _ in self._unacked.values():  # in order: redelivered in nak order
                with contextlib.suppress(Exception):
                    await msg.nak()
            if not self.durable:
                with contextlib.suppress(Exception):
                    await self.transport.js.delete_consumer(
                        self.transport.stream, self.consumer_name
                    )
        self._unacked.clear()

    async def _stop_loop(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def reconnected(self) -> None:
        """The link came back: the server forgot our request; it may have lost
        the consumer too (restart of a memory stream)."""
        self.stats.reconnects += 1
        self._heal = True
        self._request_done.set()
        self._freed.set()

    def lost(self, error: ConnectionLost) -> None:
        """No server for ``reconnect_timeout``: end with ``error``."""
        self.fail(error)
        self.finish()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def ensure_consumer(self) -> None:
        """Create the consumer, or check and bind an existing one."""
        await self.consumer_state.ensure(self.transport.js)

    # -- acknowledgement -------------------------------------------------------

    async def ack(self, event: Event) -> None:
        """Mark ``event`` processed: the consumer will not deliver it again."""
        held = self._unacked.pop(event.offset, None) if event.offset is not None else None
        if held is not None:
            self._made_room()
            await self._answer(held[0].ack())
        await super().ack(event)

    async def nack(self, event: Event, *, delay: float = 0, reason: str | None = None) -> None:
        """Deliver ``event`` again after ``delay`` s, or dead-letter it (``reason``
        as its ``x-dead-reason``) when this was its ``max_deliveries``-th failed
        delivery. A dead letter is never dead-lettered again: it is redelivered."""
        held = self._unacked.pop(event.offset, None) if event.offset is not None else None
        if held is not None:
            self._made_room()
            msg = held[0]
            deliveries = msg.metadata.num_delivered
            if should_dead_letter(event.topic, deliveries, self.transport.max_deliveries):
                why = reason or f"nacked {deliveries} times"
                await bury(
                    self.transport, self, msg, event=event, reason=why, deliveries=deliveries
                )
            else:
                await self._answer(msg.nak(delay=delay or None))
        await super().nack(event, delay=delay, reason=reason)

    def _made_room(self) -> None:
        # Wake the pull loop once half a batch is free, not on every ack: a
        # pull request per ack would cost a server round trip per event.
        if len(self._unacked) <= self.consumer_state.hold - self._low_water():
            self._freed.set()

    def _low_water(self) -> int:
        return max(1, min(self.transport.options.batch, self.consumer_state.hold) // 2)

    async def _answer(self, reply: Awaitable[None]) -> None:
        import nats.errors as nerr

        try:
            await reply
        except nerr.ConnectionClosedError:
            raise self.transport._conn.lost_error() from None

    # -- receiving -------------------------------------------------------------

    async def _pull_loop(self) -> None:
        transport = self.transport
        opts = transport.options
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{transport.stream}.{self.consumer_name}"
        pause = 0.1
        while not self._closed:
            nc = transport._conn.nc
            if self._heal:
                ok = await transport._try(transport.ensure_stream) and await transport._try(
                    self.ensure_consumer
                )
                if not ok:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 2.0)
                    continue
                self._heal, pause = False, 0.1
            if not nc.is_connected:
                await self._request_done.wait()  # set on reconnect
                self._request_done.clear()
                continue
            room = max(1, min(opts.batch, self.buffer_size - len(self._buffer)))
            if self.durable:
                free = self.consumer_state.hold - self._holding()
                if free < min(room, self._low_water()):
                    await self._wait_for_room()
                    continue
                room = min(room, free)
            self._request += 1
            self._remaining = room
            self._answered = False
            self._request_done.clear()
            request = {"batch": self._remaining, "expires": int(opts.fetch_timeout * 1e9)}
            try:
                await nc.publish(
                    subject, json.dumps(request).encode(), reply=f"{self._reply}.{self._request}"
                )
            except Exception as exc:
                transport._conn.log_once("pull", "%s: pull request failed: %s", self, exc)
                await asyncio.sleep(pause)
                continue
            try:
                await asyncio.wait_for(self._request_done.wait(), opts.fetch_timeout + _SLACK)
            except TimeoutError:
                if self._answered:
                    # Events are in hand, waiting for room in the buffer.
                    await self._request_done.wait()
                elif nc.is_connected:
                    # Not even a "request expired" answer: the consumer may be gone.
                    self._heal = True

    def _holding(self) -> int:
        """Unacked deliveries held that are younger than the consumer's ack_wait."""
        count = len(self._unacked)
        if count < self.consumer_state.hold:
            return count  # the common case: no need to look at their ages
        cutoff = asyncio.get_running_loop().time() - self.consumer_state.ack_wait
        for _, received in self._unacked.values():  # oldest first
            if received >= cutoff:
                break
            count -= 1
        return count

    async def _wait_for_room(self) -> None:
        """Until acks free half a batch, the link comes back, or the oldest held
        delivery passes ack_wait (the server then takes it back)."""
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.consumer_state.ack_wait
        oldest = next((t for _, t in self._unacked.values() if t >= cutoff), loop.time())
        self._freed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._freed.wait(), max(0.01, oldest - cutoff))

    async def _on_message(self, msg: Msg) -> None:
        if not msg.reply:  # a status for one of our requests
            status = msg.headers.get("Status") if msg.headers else None
            if msg.subject.rsplit(".", 1)[-1] == str(self._request):
                self._answered = True
                if status == "503" or (status == "409" and "deleted" in str(msg.headers).lower()):
                    self._heal = True
                if status in _END_OF_REQUEST or status == "503":
                    self._request_done.set()
            return
        self._answered = True
        try:
            await self._receive(msg)
        finally:
            self._remaining -= 1
            if self._remaining <= 0:
                self._request_done.set()

    async def _receive(self, msg: Msg) -> None:
        if self._closed:
            if self.durable:
                await msg.nak()
            return
        meta = msg.metadata
        seq = meta.sequence.stream
        self.consumer_state.seen(seq)
        transport = self.transport
        topic = to_topic(transport.prefix, msg.subject)
        if topic is None:
            await bury_malformed(transport, self, msg, None, "the subject is not a topic's")
            return
        if not self.pattern.matches(topic):
            # The consumer's filter is wider than the pattern: dead letters reach
            # '>' (only patterns naming 'dead' first match them). Skipped, not malformed.
            if self.durable:
                await msg.ack()
            return
        try:
            event = decode(msg.data, msg.headers, topic, offset=seq)
            if event is None:
                event = await self._foreign(msg, topic, seq)
                if event is None:
                    return
        except PayloadError as exc:
            await bury_malformed(transport, self, msg, topic, str(exc))
            return
        if self.durable:
            if should_dead_letter(event.topic, meta.num_delivered - 1, transport.max_deliveries):
                await bury(
                    transport,
                    self,
                    msg,
                    event=event,
                    reason=f"not acked within ack_wait={transport.options.ack_wait:g}s",
                    deliveries=meta.num_delivered - 1,
                )
                return
            if meta.num_delivered > 1:
                self.stats.redelivered += 1
            # A redelivery moves to the end: the dict stays in order received.
            self._unacked.pop(seq, None)
            self._unacked[seq] = (msg, asyncio.get_running_loop().time())
        self.stats.lag = meta.num_pending + len(self._buffer) + 1
        if not await self.put(event) and self.durable:
            self._unacked.pop(seq, None)
            await msg.nak()

    async def _foreign(self, msg: Msg, topic: str, seq: int) -> Event | None:
        """A foreign message as an event (``foreign=adopt``), or None once it is
        dead-lettered (``dead_letter``, named consumers) or counted and dropped."""
        transport = self.transport
        mode = transport.options.foreign
        if mode == "adopt":
            seed = f"{transport.stream}/{seq}"
            return adopt(
                msg.data, topic, seed=seed, offset=seq, published_at=msg.metadata.timestamp
            )
        if mode == "dead_letter" and self.durable and not is_dead_letter(topic):
            await bury(
                transport, self, msg, topic=topic, reason="foreign message (foreign=dead_letter)",
                deliveries=msg.metadata.num_delivered,
            )  # fmt: skip
            return None
        transport.report_malformed(self, "foreign", f"a foreign message on {msg.subject!r}")
        if self.durable:
            await msg.term()
        return None
