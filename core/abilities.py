"""Optional abilities of a transport, as small runtime-checkable protocols.

A transport has an ability when it has the method or attribute, whatever class
it derives from; callers test with ``isinstance(transport, ConsumerStatsSource)``
instead of probing names (Watermill's optional interfaces work the same way).
The built-in transports derive from :class:`~alkpubsub.BaseTransport`, which
gives every one of them :class:`Connectable` and :class:`Forwarding`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

from .event import Event

DEFAULT_MAX_DELIVERIES = 5
"""Deliveries of one event before a durable transport dead-letters it."""


@runtime_checkable
class Connectable(Protocol):
    """Opens its connections in ``connect()`` (``alkpubsub.connect`` awaits it)."""

    async def connect(self) -> None: ...


@runtime_checkable
class Forwarding(Protocol):
    """Publishes an existing event unchanged (same id, origin and time), so a
    composite or relay lets subscribers deduplicate by id across transports."""

    async def forward(self, event: Event) -> Event: ...


@dataclass(frozen=True, slots=True)
class Forwarded:
    """What became of one event handed to :meth:`BatchForwarding.forward_many`."""

    event: Event
    """The event as the target stored it (its ``offset`` set where the target has one)."""
    duplicate: bool = False
    """The target already held this id within its dedupe window and dropped the
    copy (JetStream ``Nats-Msg-Id``, the Redis transports' ``dedupe_window``)."""
    refused: Exception | None = None
    """Set when the target can never take this event (a :class:`PayloadError`,
    e.g. too large for it); the other events of the batch were still forwarded."""


@runtime_checkable
class BatchForwarding(Protocol):
    """Forwards existing events unchanged in one pipelined batch, in order, and
    says which the target deduplicated or refused (the outbox relay uses it).
    It returns only once the target confirmed every event it did not refuse;
    any other failure raises, and the whole batch may be forwarded again
    (targets that deduplicate by id drop the copies). ``decoded=True`` says the
    events come unchanged from a reader that held them to the publish limits
    already, so their payloads need not be checked again."""

    async def forward_many(
        self, events: Sequence[Event], *, decoded: bool = False
    ) -> list[Forwarded]: ...


@dataclass(frozen=True, slots=True)
class ConsumerStat:
    """One named durable consumer as its transport sees it."""

    consumer: str
    offset: int
    """The last position delivered or saved (transport-specific origin)."""
    lag: int | None
    """Events in the log past ``offset``, when the transport knows."""
    unacked: int | None = None
    """Deliveries awaiting an ack, when the transport tracks them."""
    kind: str = "alkpubsub"
    """Whose consumer this is: ``alkpubsub``, or a native one sharing the log."""

    def as_dict(self) -> dict[str, object]:
        """A plain dict, for the CLI and logs."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@runtime_checkable
class ConsumerStatsSource(Protocol):
    """Lists the durable consumers of its log (``alkpubsub stats``)."""

    async def consumer_stats(self) -> list[ConsumerStat]: ...


@runtime_checkable
class DeadLetterPolicy(Protocol):
    """Dead-letters an event after ``max_deliveries`` failed deliveries."""

    @property
    def max_deliveries(self) -> int: ...


def max_deliveries_of(transport: object) -> int | None:
    """The transport's dead-letter threshold, or None if it has no dead letters."""
    if isinstance(transport, DeadLetterPolicy):
        return transport.max_deliveries
    return None
