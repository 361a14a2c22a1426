"""alkpubsub: one publish/subscribe interface, transports chosen by configuration.

>>> transport = await alkpubsub.connect("memory://")          # doctest: +SKIP
>>> async with transport.subscribe("graph:*") as sub:          # doctest: +SKIP
...     await transport.publish("graph:created", {"id": 1})
...     event = await sub.get(timeout=1)
"""

from .capabilities import Capabilities, Start
from .config import Settings, redact_url
from .errors import (
    Closed,
    ConfigError,
    ConnectionLost,
    ConstraintViolation,
    ConsumerBusy,
    DatabaseBusy,
    InvalidTopic,
    PayloadError,
    PublishError,
    PubSubError,
    SQLError,
    StorageError,
    TransactionOpen,
    Unauthorized,
)
from .event import Event
from .registry import connect, register
from .topics import Pattern, matches, validate_topic
from .transport import BaseTransport, Subscription, SubscriptionStats, Transport
from .typed import PubSub, TypedSubscription, TypedTopic

__version__ = "0.1.0"

__all__ = [
    "BaseTransport",
    "Capabilities",
    "Closed",
    "ConfigError",
    "ConnectionLost",
    "ConstraintViolation",
    "ConsumerBusy",
    "DatabaseBusy",
    "Event",
    "InvalidTopic",
    "Pattern",
    "PayloadError",
    "PubSub",
    "PubSubError",
    "PublishError",
    "SQLError",
    "Settings",
    "Start",
    "StorageError",
    "Subscription",
    "SubscriptionStats",
    "TransactionOpen",
    "Transport",
    "TypedSubscription",
    "TypedTopic",
    "Unauthorized",
    "__version__",
    "connect",
    "matches",
    "redact_url",
    "register",
    "validate_topic",
]
