"""Honker ephemeral transport: live events through a SQLite file (notify/listen).

Features
    persistent: no   replay: no   ordered: yes   wildcards: yes
    cross_process: yes (any process on this host that opens the same file)
    transactional_publish: yes (``store.transaction()`` ``tx.notify``)
    competing consumers: no   dead letter: no
    Each publish inserts a row into honker's ``_honker_notifications`` (channel
    = topic, payload = the JSON envelope, or with ``format=cloudevents`` a
    structured CloudEvent); subscribers see it when it commits.
    Like NOTIFY/LISTEN: live only, at most once, no replay. A subscription
    receives every event committed after ``__aenter__`` returned and none
    before. Concurrent publishes share one commit (group commit); a slow
    subscriber's full buffer drops its oldest event (``stats.dropped``).
    One wake-up watcher and one read per commit serve every subscription on
    the file in this process (see ``alkpubsub.storage``).

    Notifications are pruned automatically by each process that writes the
    file, once older than ``notify_retention`` seconds (never a row a watcher
    of this process has not read yet); see ``alkpubsub.storage.pruning``.
    Rows are parsed, never sniffed (``alkpubsub.storage.rows``). Foreign rows
    (honker's own ``tx.notify(channel, payload)``, the Node binding, any SQLite
    client: JSON or text that is not our envelope) are adopted with
    ``foreign=adopt``: topic = the channel, id ``uuid5(file, row id)``, payload
    the JSON (else the text), header ``x-alk-foreign: json|text``, origin
    ``foreign``, ``published_at`` the row's ``created_at``. Structured
    CloudEvents are decoded (their ``topic`` must be the channel). Rows that
    claim to be our envelope but are invalid, name another topic than their
    channel (a spoof), or are BLOBs or not UTF-8 are counted in
    ``stats.malformed`` and skipped. If the file is replaced or deleted while
    open, subscriptions and publishes raise ``ConnectionLost``; a new transport opens the new file.

Connection String
    ``honker:///abs/path/events.db``   an absolute path
    ``honker:///./events.db``          relative to the working directory
    ``honker://./events.db``           the same, without the third slash
    The file is created if missing (mode 0600); its directory must exist.

Transport Options
    notify_retention  60   seconds a notification is kept before this process's
                           writer prunes it; 0 = never. The first store opened on a
                           path in a process sets it.
    foreign        adopt   foreign rows: ``adopt`` (delivered, see above) or ``drop``
                           (counted in ``stats.malformed``); ``dead_letter`` is refused
                           (no dead letters on an ephemeral transport)
    format     alkpubsub   what publishes write: ``alkpubsub`` or ``cloudevents``
                           (structured); readers take both. ``cloudevents-binary`` is
                           refused: rows have no headers
    tenant         (none)  the path is a deployment root and the file this tenant's:
                           ``tenant-<id>.db`` (``system``: ``system.db``), as ``Stores``
                           lays them out; an unsafe id is refused
    (``Settings.origin`` sets the origin stamped on published events.)
"""

from __future__ import annotations

from pydantic import Field, field_validator

from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.config import Settings, TransportOptions, parse_options, parse_url
from alkpubsub.errors import ConfigError
from alkpubsub.event import Event
from alkpubsub.storage import (
    DEFAULT_NOTIFY_RETENTION,
    ForeignMode,
    RowDecoder,
    Store,
    Watcher,
    check_foreign_mode,
)
from alkpubsub.transport import BaseTransport, Subscription

from ._honker_common import Format, StoreHolder, check_format, database_path, encoder


class HonkerSubscription(Subscription):
    """A live subscription fed by the database's shared watcher."""

    transport: HonkerTransport
    after_id: int = 0
    _watcher: Watcher | None = None

    async def on_start(self) -> None:
        store = await self.transport._holder.get()
        self._watcher = store.watcher()
        self._watcher.add_listener(self)

    async def on_close(self) -> None:
        if self._watcher is not None:
            self._watcher.remove_listener(self)
            self._watcher = None

    @property
    def decoder(self) -> RowDecoder:
        """How rows become events for this subscription (its transport's options)."""
        return self.transport.decoder

    def count_malformed(self, detail: str, kind: str) -> None:
        """Count a row meant for this subscription that is no event (or a dropped
        foreign one)."""
        self.transport.report_malformed(self, kind, detail)


class HonkerTransport(BaseTransport):
    """Live publish/subscribe through a Honker (SQLite) file."""

    capabilities = Capabilities(
        ordered=True, wildcards=True, cross_process=True, transactional_publish=True
    )

    def __init__(
        self,
        path: str,
        *,
        origin: str | None = None,
        notify_retention: float = DEFAULT_NOTIFY_RETENTION,
        foreign: ForeignMode = "adopt",
        format: Format = "alkpubsub",
    ) -> None:
        super().__init__(origin=origin)
        self.name = f"honker://{path}" if path.startswith("/") else f"honker:///{path}"
        self._holder = StoreHolder(path, self.origin, notify_retention)
        self.foreign = _check_foreign(foreign)
        self.format = check_format(format)
        self._encode = encoder(self.format)
        self.decoder = RowDecoder(f"honker:{StoreHolder.resolved(path)}#notify", self.foreign)
        """Reads notification rows into events (``alkpubsub.storage.rows``)."""

    async def connect(self) -> None:
        """Open the database file (shared with every transport on it in this process)."""
        self.check_open()
        await self._holder.get()

    @property
    def store(self) -> Store:
        """The storage handle on this file: ``transport.store.transaction()`` publishes
        with this transport's origin."""
        return self._holder.store or self._holder.open_now()

    async def send(self, event: Event, body: bytes) -> Event:
        store = self._holder.store or await self._holder.get()
        await store.notify_many([(event.topic, self._encode(event, body))])
        return event

    async def send_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        store = self._holder.store or await self._holder.get()
        encode = self._encode
        await store.notify_many([(e.topic, encode(e, b)) for e, b in batch])
        return [event for event, _ in batch]

    def make_subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        return HonkerSubscription(self, pattern, consumer=consumer, start=start, buffer=buffer)

    async def disconnect(self) -> None:
        self._holder.close()


def _check_foreign(value: str) -> ForeignMode:
    mode = check_foreign_mode(value)
    if mode == "dead_letter":
        raise ConfigError(
            "foreign='dead_letter': honker:// is ephemeral and has no dead letters; "
            "use foreign=adopt (the default) or foreign=drop, or honker+durable://"
        )
    return mode


class _Options(TransportOptions):
    notify_retention: float = Field(DEFAULT_NOTIFY_RETENTION, ge=0)
    foreign: str = "adopt"
    format: str = "alkpubsub"
    tenant: str | None = None

    @field_validator("foreign")
    @classmethod
    def _foreign(cls, value: str) -> str:
        return _check_foreign(value)

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        return check_format(value)


def from_url(url: str, settings: Settings | None = None) -> HonkerTransport:
    """Build a transport from ``honker:///path/events.db`` (see the module docstring)."""
    parsed = parse_url(url)
    options = parse_options(_Options, parsed, settings)
    return HonkerTransport(
        database_path(parsed, options.tenant),
        origin=settings.origin if settings else None,
        notify_retention=options.notify_retention,
        foreign=_check_foreign(options.foreign),
        format=check_format(options.format),
    )
