"""Every error a user can cause is a subclass of :class:`PubSubError`.

Messages name the input that was wrong and say how to fix it. They never
contain secrets: URLs are passed through :func:`alkpubsub.config.redact_url`
before they are put in a message.
"""

from __future__ import annotations

from typing import Any


class PubSubError(Exception):
    """Base class of every error alkpubsub raises on purpose."""


class InvalidTopic(PubSubError, ValueError):
    """A topic or pattern breaks the topic grammar (see ``alkpubsub.topics``)."""


class PayloadError(PubSubError, ValueError):
    """A payload is not JSON-serialisable, too large for the transport, or failed validation."""


class ConfigError(PubSubError, ValueError):
    """A URL, setting or option is wrong, unknown, or needs an extra that is not installed."""


class ConnectionLost(PubSubError, ConnectionError):
    """The broker went away and the transport could not (yet) get it back."""


class PublishError(PubSubError):
    """A publish was not accepted. ``succeeded`` names the legs that did accept
    it; ``events`` holds the events of the failed publish where the transport
    knows them (the composite), so a retry can ``forward`` them with their ids."""

    def __init__(
        self, message: str, *, succeeded: tuple[str, ...] = (), events: tuple[Any, ...] = ()
    ) -> None:
        super().__init__(message)
        self.succeeded = succeeded
        self.events = events


class ConsumerBusy(PubSubError):
    """Another live subscription already uses this consumer name, and the
    transport cannot share a consumer's work between subscriptions."""


class Closed(PubSubError):
    """The transport or subscription was closed; open a new one."""


__all__ = [
    "Closed",
    "ConfigError",
    "ConnectionLost",
    "ConsumerBusy",
    "InvalidTopic",
    "PayloadError",
    "PubSubError",
    "PublishError",
]
