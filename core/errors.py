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


class Unauthorized(PubSubError):
    """The hub refused the credentials, or they do not cover the topic or
    pattern asked for (a spoke's ``ws://`` transport)."""


__all__ = [
    "Closed",
    "ConfigError",
    "ConnectionLost",
    "ConsumerBusy",
    "InvalidTopic",
    "PayloadError",
    "PubSubError",
    "PublishError",
    "Unauthorized",
]


class StorageError(PubSubError):
    """A statement run through a Honker store (``tx.execute``, ``tx.query``)
    failed. Once it leaves ``store.transaction()`` / ``atransaction()``, the
    whole transaction is rolled back: no row and no event of it is committed.
    ``statement`` is the SQL (never its parameters, which may hold secrets);
    ``sqlite_message`` is what SQLite said."""

    def __init__(self, message: str, *, statement: str = "", sqlite_message: str = "") -> None:
        super().__init__(message)
        self.statement = statement
        self.sqlite_message = sqlite_message


class ConstraintViolation(StorageError):
    """A row broke a constraint: ``kind`` is ``UNIQUE``, ``NOT NULL``,
    ``CHECK``, ``FOREIGN KEY`` or ``PRIMARY KEY``; ``table`` and ``columns``
    name where, when SQLite says (a CHECK names its expression instead)."""

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        table: str | None = None,
        columns: tuple[str, ...] = (),
        statement: str = "",
        sqlite_message: str = "",
    ) -> None:
        super().__init__(message, statement=statement, sqlite_message=sqlite_message)
        self.kind = kind
        self.table = table
        self.columns = columns


class SQLError(StorageError):
    """The statement itself is wrong: a syntax error, or a table or column that
    does not exist."""


class DatabaseBusy(StorageError, PublishError):
    """Another writer held the file past the store's ``busy_timeout``: raised by
    a store transaction and, being a :class:`PublishError` too, by a Honker
    transport's publish. Nothing of the write was committed."""

    def __init__(self, message: str, *, statement: str = "", sqlite_message: str = "") -> None:
        PubSubError.__init__(self, message)
        self.statement = statement
        self.sqlite_message = sqlite_message
        self.succeeded: tuple[str, ...] = ()
        self.events: tuple[Any, ...] = ()


class TransactionOpen(PubSubError):
    """A write was asked for on the event loop's thread while an async store
    transaction on the same file is open on that loop: it would wait for that
    transaction forever (the transaction waits for the loop). Use the open
    transaction's ``tx`` (``tx.enqueue``, ``tx.acquire_lock``, ``tx.publish``,
    ...) or make the call after the block."""
