"""How the outbox relay forwards one batch: retried until the target confirms
it, in order, never skipped (see :mod:`alkpubsub.storage.outbox_relay`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from alkpubsub.abilities import BatchForwarding, Forwarded
from alkpubsub.errors import Closed, InvalidTopic, PayloadError, PubSubError
from alkpubsub.event import Event

from .relay_stats import RelayStats

log = logging.getLogger("alkpubsub.relay")


class BatchForwarder:
    """Forwards batches to ``target`` for the relay named ``consumer``, counting
    retries in ``stats``. ``stopped`` is a task that finishes when the relay is
    told to stop: waits end early then, and a forward in flight gets
    ``drain_timeout`` more seconds before it is abandoned."""

    def __init__(
        self,
        target: BatchForwarding,
        *,
        name: str,
        consumer: str,
        stats: RelayStats,
        stopped: asyncio.Task[bool],
        retry_delay: float,
        max_retry_delay: float,
        drain_timeout: float,
    ) -> None:
        self.target = target
        self.name = name
        self.consumer = consumer
        self.stats = stats
        self.stopped = stopped
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.drain_timeout = drain_timeout

    async def forward(self, batch: Sequence[Event]) -> list[Forwarded]:
        """One result per event of ``batch``, in order, once the target confirmed
        them; fewer (a prefix, maybe none) when stopped while the target is down."""
        delay = self.retry_delay
        failures = 0
        while True:
            try:
                results = await self._confirmed(batch)
            except (PayloadError, InvalidTopic) as exc:
                # The target refused the whole batch for one event's sake: find which.
                if len(batch) == 1:
                    return [Forwarded(batch[0], refused=exc)]
                return await self._one_by_one(batch)
            except (PubSubError, OSError) as exc:
                if isinstance(exc, Closed):
                    raise
                failures += 1
                self.stats.retried += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                if failures == 1 or failures % 30 == 0:
                    log.warning(
                        "relay %s: %s did not take %d events (%s); retrying in %.1f s",
                        self.consumer,
                        self.name,
                        len(batch),
                        exc,
                        delay,
                    )
                if await self.sleep(delay):
                    return []
                delay = min(delay * 2, self.max_retry_delay)
                continue
            if results is None:
                return []  # stopped, and the target did not answer in time
            if failures:
                log.info("relay %s: %s takes events again", self.consumer, self.name)
            return results

    async def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if stopped; True when stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.stopped), seconds)
        return self.stopped.done()

    async def _confirmed(self, batch: Sequence[Event]) -> list[Forwarded] | None:
        """``forward_many``; once stopped, it gets ``drain_timeout`` more seconds,
        then is abandoned (None): its events stay unacked at the source and the
        target drops the copies that a later relay sends again."""
        task = asyncio.ensure_future(self.target.forward_many(batch, decoded=True))
        if not self.stopped.done():
            await asyncio.wait((task, self.stopped), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait((task,), timeout=self.drain_timeout)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            log.warning(
                "relay %s: stopping; %s did not confirm the batch in flight within %.1f s "
                "(it stays unacked and is forwarded again by the next relay)",
                self.consumer,
                self.name,
                self.drain_timeout,
            )
            return None
        return task.result()

    async def _one_by_one(self, batch: Sequence[Event]) -> list[Forwarded]:
        done: list[Forwarded] = []
        for event in batch:
            result = await self.forward([event])
            if not result:
                break  # stopped
            done.extend(result)
        return done
