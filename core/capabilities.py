"""What a transport can do. The conformance suite reads these to decide what to demand,
and checks that a transport refuses, with :class:`ConfigError`, what it does not declare."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

Start = Literal["new", "earliest"] | int
"""Where a durable consumer with no saved position starts: only new events,
the earliest retained one, or a given offset."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Declared features of a transport. All default to False."""

    persistent: bool = False
    """Events survive a restart of the process or broker."""
    replay: bool = False
    """A subscription can start at ``"earliest"`` or an offset."""
    consumer_offsets: bool = False
    """Named consumers resume after their last acked event."""
    competing_consumers: bool = False
    """Subscriptions sharing a consumer name split the events."""
    ordered: bool = False
    """Events from one publisher on one topic arrive in publish order."""
    cross_process: bool = False
    """Another process on this host can publish to and subscribe from it."""
    cross_node: bool = False
    """Another machine can publish to and subscribe from it."""
    transactional_publish: bool = False
    """Events can be published inside a storage transaction."""
    wildcards: bool = False
    """Subscribe patterns may contain ``*`` and ``>``."""
    dead_letter: bool = False
    """Events that fail ``max_deliveries`` times go to ``dead:<topic>``."""

    def names(self) -> list[str]:
        """Names of the declared capabilities."""
        return [f.name for f in fields(self) if getattr(self, f.name)]
