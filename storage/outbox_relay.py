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

from alkpubsub.abilities import Forwarding
from alkpubsub.errors import ConfigError, PayloadError, PubSubError
from alkpubsub.event import Event
from alkpubsub.transport import Transport

log = logging.getLogger("alkpubsub.relay")


@dataclass
class RelayStats:
    """What the relay has done so far."""

    forwarded: int = 0
    retries: int = 0
    refused: int = 0
    """Events the target can never take (e.g. over its size limit): nacked at
    the source, which dead-letters them after its ``max_deliveries``."""


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
        if not isinstance(target, Forwarding):
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
                if await self._forward(event):
                    await sub.ack(event)
                    self.stats.forwarded += 1
                else:
                    await sub.nack(event)

    async def _forward(self, event: Event) -> bool:
        """Forward ``event``; False when the target can never take it."""
        target = self.target
        assert isinstance(target, Forwarding)  # checked in __init__
        while True:
            try:
                await target.forward(event.with_offset(None))
                return True
            except PayloadError as exc:
                # Too large (or otherwise unfit) for the target: retrying cannot
                # help, and would hold every later event back. Refuse it at the
                # source, which dead-letters it after max_deliveries: kept, visible.
                self.stats.refused += 1
                log.error("relay: %s refused %s for good (%s)", target.name, event.id, exc)
                return False
            except PubSubError as exc:
                # The event stays unacked at the source; keep trying, in order.
                self.stats.retries += 1
                if self.stats.retries == 1 or self.stats.retries % 60 == 0:
                    log.warning(
                        "relay: %s refused %s (%s); retrying", self.target.name, event.id, exc
                    )
                await asyncio.sleep(self.retry_delay)
