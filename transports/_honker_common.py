"""What the Honker transports share: the URL -> file rule, opening the store, and
the ``format`` option. (Every statement on honker's tables is in ``alkpubsub.storage``.)

URL -> file
    ``honker:///abs/path.db``       the absolute path ``/abs/path.db``
    ``honker:///./rel.db``          ``./rel.db``, relative to the working directory
                                     (also ``honker:///../rel.db``)
    ``honker://./rel.db``           the same relative path, written without the third slash
    Any other host part (``honker://events.db``) is refused: it would silently be a
    host name, not a file. ``:memory:`` is refused (honker's readers could not see it).
    The same rules hold for ``honker+durable://``.

Tenants
    With the ``tenant`` option the path names a deployment's root directory and
    the file is the tenant's, as :class:`alkpubsub.storage.Stores` lays it out:
    ``honker+durable:///data?tenant=acme`` is ``/data/tenant-acme.db``, and
    ``tenant=system`` the deployment-wide ``/data/system.db``. A tenant id that
    is not a safe file-name segment is refused (``Stores``' rule). The option
    can also come from ``Settings.options`` (``ALKPUBSUB_OPTIONS='{"tenant": "acme"}'``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Literal

from alkpubsub.cloudevents import to_structured
from alkpubsub.config import ParsedUrl
from alkpubsub.errors import ConfigError
from alkpubsub.event import Event
from alkpubsub.storage import DEFAULT_NOTIFY_RETENTION, Store, open_store


def database_path(url: ParsedUrl, tenant: str | None = None) -> str:
    """The database file a ``honker://`` or ``honker+durable://`` URL names (see above)."""
    if tenant is not None:
        from alkpubsub.storage import tenant_file

        root = url.path.rstrip("/") or "/"
        if url.host in (".", ".."):
            root = url.host + root
        elif url.host:
            _plain_path(url)  # refuses a host part, naming the fix
        elif root.startswith(("/./", "/../")):
            root = root[1:]
        return tenant_file(root, tenant)
    return _plain_path(url)


def _plain_path(url: ParsedUrl) -> str:
    host = url.host or ""
    path = url.path
    example = f"{url.scheme}:///./events.db (relative) or {url.scheme}:///var/lib/app/events.db"
    if host in (".", ".."):
        path = host + path
    elif host:
        raise ConfigError(
            f"{url.redacted!r} names host {host!r}, but Honker is a local file; "
            f"write {url.scheme}:///./{host}{path} or another path, e.g. {example}"
        )
    elif path.startswith(("/./", "/../")):
        path = path[1:]
    if path.strip("/.") == "" or path.endswith("/"):
        raise ConfigError(f"{url.redacted!r} names no database file; use e.g. {example}")
    if path.rsplit("/", 1)[-1] == ":memory:":
        raise ConfigError(
            f"{url.redacted!r}: Honker cannot use an in-memory database (its reader "
            f"connections would not see it); use a file, e.g. {example}"
        )
    return path


class StoreHolder:
    """Opens the transport's store on first use, off the event loop."""

    def __init__(
        self, path: str, origin: str, notify_retention: float = DEFAULT_NOTIFY_RETENTION
    ) -> None:
        self.path = path
        self.origin = origin
        self.notify_retention = notify_retention
        self.store: Store | None = None
        self._opening: asyncio.Lock | None = None

    async def get(self) -> Store:
        if self.store is not None:
            return self.store
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self.store is None:
                # Opening may create the file and wait for another writer: not on the loop.
                self.store = await asyncio.to_thread(self._open)
        return self.store

    @staticmethod
    def resolved(path: str) -> str:
        """The absolute path of ``path`` (the same text in every process)."""
        return os.path.realpath(path)

    def open_now(self) -> Store:
        """Open synchronously (for callers outside the event loop)."""
        if self.store is None:
            self.store = self._open()
        return self.store

    def _open(self) -> Store:
        return open_store(self.path, origin=self.origin, notify_retention=self.notify_retention)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


# -- options both transports share ---------------------------------------------

Format = Literal["alkpubsub", "cloudevents"]


def check_format(value: str) -> Format:
    """``format`` is ``alkpubsub`` or ``cloudevents``: SQLite rows have no message
    headers, so binary CloudEvents cannot be written; raise :class:`ConfigError`."""
    if value == "cloudevents-binary":
        raise ConfigError(
            "format='cloudevents-binary' needs message headers, which Honker rows do not "
            "have; use format=cloudevents (structured: the CloudEvent is the row's JSON)"
        )
    if value not in ("alkpubsub", "cloudevents"):
        raise ConfigError(
            f"format={value!r} is not an option value; use format=alkpubsub (the default) "
            "or format=cloudevents"
        )
    return value  # type: ignore[return-value]


def encoder(fmt: Format) -> Callable[[Event, bytes], str]:
    """How an event becomes a row's payload text in format ``fmt``."""
    if fmt == "cloudevents":
        return lambda event, body: to_structured(event, body).decode()
    return lambda event, body: event.envelope(body).decode()


def place_offset(event: Event, offset: int) -> Event:
    """Set ``offset`` on an event just decoded from a row. The event is new and not
    shared yet, so writing the field directly is safe, and 30x cheaper than
    ``model_copy``; pydantic keeps field values in ``__dict__``."""
    event.__dict__["offset"] = offset
    return event
