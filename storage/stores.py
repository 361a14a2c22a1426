"""The databases of one deployment: ``system.db`` and one file per tenant."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from urllib.parse import quote, urlencode

from alkpubsub.errors import ConfigError

from .pruning import DEFAULT_NOTIFY_RETENTION
from .store import DEFAULT_BUSY_TIMEOUT, Store, open_store

_ORG_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def check_org_id(org_id: str) -> str:
    """A tenant id must be a safe file-name segment; raise :class:`ConfigError` otherwise."""
    if not isinstance(org_id, str) or not _ORG_ID.fullmatch(org_id) or ".." in org_id:
        raise ConfigError(
            f"tenant id {org_id!r} is not a safe file-name segment: use 1..128 characters of "
            "[A-Za-z0-9_.-], starting with a letter or digit, without '..'"
        )
    return org_id


SYSTEM = "system"
"""The ``tenant`` value naming the deployment-wide ``system.db``."""


def tenant_file(root: str | os.PathLike[str], tenant: str) -> str:
    """The file of ``tenant`` (an org id, or ``system``) under ``root``; the
    directory is created if missing."""
    name = "system.db" if tenant == SYSTEM else f"tenant-{check_org_id(tenant)}.db"
    _make_root(Path(root))
    return str(Path(root) / name)


def _make_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise ConfigError(
            f"{str(root)!r} is a file: with tenants the path is the deployment's directory "
            "(tenant-<id>.db and system.db are made in it), not a database file"
        )
    root.mkdir(parents=True, exist_ok=True)


class Stores:
    """The databases of one deployment under ``root``: ``system.db`` and one
    ``tenant-<org_id>.db`` per tenant. Handles are opened once and kept until
    :meth:`close`."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        origin: str | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        notify_retention: float = DEFAULT_NOTIFY_RETENTION,
    ) -> None:
        self.root = Path(root)
        _make_root(self.root)
        self._origin = origin
        self._busy_timeout = busy_timeout
        self._notify_retention = notify_retention
        self._open: dict[str, Store] = {}
        self._lock = threading.Lock()

    def system(self) -> Store:
        """The deployment-wide database, ``<root>/system.db``."""
        return self._get("system.db")

    def tenant(self, org_id: str) -> Store:
        """The database of one tenant, ``<root>/tenant-<org_id>.db``."""
        return self._get(f"tenant-{check_org_id(org_id)}.db")

    def url(self, org_id: str = SYSTEM, *, durable: bool = True, **options: str) -> str:
        """The transport URL of a tenant's database (``system``: the deployment's),
        for ``alkpubsub.connect``: ``honker+durable://<root>?tenant=<org_id>``
        (``honker://`` with ``durable=False``), plus ``options``."""
        if org_id != SYSTEM:
            check_org_id(org_id)
        scheme = "honker+durable" if durable else "honker"
        query = urlencode({"tenant": org_id, **options})
        return f"{scheme}://{quote(str(self.root.resolve()))}?{query}"

    def _get(self, name: str) -> Store:
        with self._lock:
            store = self._open.get(name)
            if store is None or store.closed:
                store = self._open[name] = open_store(
                    self.root / name,
                    origin=self._origin,
                    busy_timeout=self._busy_timeout,
                    notify_retention=self._notify_retention,
                )
            return store

    def close(self) -> None:
        """Close every handle this object opened."""
        with self._lock:
            stores, self._open = list(self._open.values()), {}
        for store in stores:
            store.close()

    def __enter__(self) -> Stores:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
