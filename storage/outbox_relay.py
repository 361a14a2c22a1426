"""Outbox relay: carry committed events from a durable source to a broker.

The relay is a durable consumer of the source (normally
``honker+durable:///app.db``): it forwards each event unchanged (same ``id``
and ``origin``) to the target and acks it at the source only after the target
accepted it. So it delivers at least once; the target deduplicates retries by
event id (JetStream ``Nats-Msg-Id``; see each transport's docs), and
subscribers on other nodes see each event once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from alkpubsub.errors import ConfigError, PubSubError
from alkpubsub.event import Event
from alkpubsub.transport import Transport

log = logging.getLogger("alkpubsub.relay")


@dataclass
class RelayStats:
    """What the relay has done so far."""

    forwarded: int = 0
    retries: int = 0


class OutboxRelay:
    """Forward events matching ``pattern`` from ``source`` to ``target``."""

    def __init__(
        self,
        source: Transport,
        target: Transport,
        *,
        pattern: str = ">",
        consumer: str = "outbox-relay",
        start: int | str = "earliest",
        retry_delay: float = 1.0,
    ) -> None:
        if not source.capabilities.consumer_offsets:
            raise ConfigError(
                f"relay source {source.name} is not durable; use a honker+durable:// URL "
                "so the relay can resume where it stopped"
            )
        if getattr(target, "forward", None) is None:
            raise ConfigError(f"relay target {target.name} cannot forward events unchanged")
        self.source = source
        self.target = target
        self.pattern = pattern
        self.consumer = consumer
        self.start = start
        self.retry_delay = retry_delay
        self.stats = RelayStats()

    async def run(self, *, stop: asyncio.Event | None = None, limit: int | None = None) -> None:
        """Relay until ``stop`` is set, ``limit`` events were forwarded, or cancelled."""
        sub = self.source.subscribe(
            self.pattern,
            consumer=self.consumer,
            start=self.start,  # type: ignore[arg-type]
        )
        async with sub:
            while (stop is None or not stop.is_set()) and (
                limit is None or self.stats.forwarded < limit
            ):
                try:
                    event = await sub.get(timeout=0.5)
                except TimeoutError:
                    continue
                await self._forward(event)
                await sub.ack(event)
                self.stats.forwarded += 1

    async def _forward(self, event: Event) -> None:
        forward = getattr(self.target, "forward")  # noqa: B009 - checked in __init__
        while True:
            try:
                await forward(event.with_offset(None))
                return
            except PubSubError as exc:
                # The event stays unacked at the source; keep trying, in order.
                self.stats.retries += 1
                if self.stats.retries == 1 or self.stats.retries % 60 == 0:
                    log.warning(
                        "relay: %s refused %s (%s); retrying", self.target.name, event.id, exc
                    )
                await asyncio.sleep(self.retry_delay)
