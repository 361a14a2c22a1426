"""The outbox relay's counters, in code and in a small JSON file beside the database.

A running relay rewrites ``<db>.relay-<consumer>.json`` about once a second
(atomically: a temporary file, then ``os.replace``), so ``alkpubsub stats`` in
another process shows what it did. Why a file and not a table in the database:
a table would be one more commit per second on the file's single writer, and
every commit wakes each subscription that watches the file, in every process;
the counters are no data the application must keep transactionally, and a
file can be read while the database is busy. A file whose relay is gone (its
pid no longer runs on this host, or it was not rewritten for
:data:`STALE_AFTER` seconds) is shown as not active.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alkpubsub.abilities import ConsumerStatsSource
from alkpubsub.errors import PubSubError

log = logging.getLogger("alkpubsub.relay")

STALE_AFTER = 10.0
"""Seconds without a rewrite after which a relay's file no longer counts as active."""

_HOST = socket.gethostname()


@dataclass
class RelayStats:
    """What the relay has done so far (``relay.stats``)."""

    forwarded: int = 0
    """Events the target confirmed as newly stored, then acked at the source."""
    duplicates: int = 0
    """Events the target already held (deduplicated by id), acked at the source."""
    retried: int = 0
    """Failed batch forwards that were tried again (target down or refusing for now)."""
    refused: int = 0
    """Events the target can never take (e.g. over its size limit): nacked at
    the source, which dead-letters them after its ``max_deliveries``."""
    batches: int = 0
    """Batches the target confirmed."""
    lag: int | None = None
    """Source events past the relay's position (other topics included), when known."""
    active: bool = False
    """True while this relay holds the consumer name; False while standing by."""
    last_error: str | None = None
    """The last failure of a forward, as the transport described it (no secrets)."""

    def as_dict(self) -> dict[str, Any]:
        """A plain dict, for logs, the stats file and the CLI."""
        return asdict(self)


def stats_path(database: str | os.PathLike[str], consumer: str) -> Path:
    """The stats file of the relay named ``consumer`` on ``database``."""
    db = Path(database)
    return db.with_name(f"{db.name}.relay-{consumer}.json")


def write_stats(path: Path, record: dict[str, Any]) -> None:
    """Replace ``path`` with ``record`` as JSON, atomically (readers never see half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, path)


def relay_record(stats: RelayStats, **extra: Any) -> dict[str, Any]:
    """What the stats file holds: the counters plus who wrote them and when."""
    return {
        **stats.as_dict(),
        "pid": os.getpid(),
        "host": _HOST,
        "updated_at": time.time(),
        **extra,
    }


def read_stats(database: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every relay stats file beside ``database``, by consumer name; ``active``
    is corrected to False when the writer is gone or the file is stale."""
    db = Path(database)
    found = []
    for path in sorted(db.parent.glob(f"{db.name}.relay-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # removed or being replaced right now
        if not isinstance(record, dict):
            continue
        record.setdefault("consumer", path.name[len(db.name) + len(".relay-") : -len(".json")])
        if record.get("active") and not _alive(record):
            record["active"] = False
            record["gone"] = True
        found.append(record)
    return found


def _alive(record: dict[str, Any]) -> bool:
    updated = record.get("updated_at")
    if not isinstance(updated, (int, float)) or time.time() - updated > STALE_AFTER:
        return False
    pid = record.get("pid")
    if record.get("host") != _HOST or not isinstance(pid, int):
        return True  # another host's relay: fresh enough is all we can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def written_by(path: Path) -> int | None:
    """The pid that last wrote the stats file ``path``, or None if there is none."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = record.get("pid") if isinstance(record, dict) else None
    return pid if isinstance(pid, int) else None


class StatsFile:
    """The stats file one relay writes; ``about`` goes into every record
    (consumer, pattern, redacted URLs)."""

    def __init__(self, path: Path, **about: Any) -> None:
        self.path = path
        self.about = about

    def write(self, stats: RelayStats, *, position: int, active: bool | None = None) -> None:
        """Rewrite the file with ``stats`` (a failure is logged, never raised)."""
        record = relay_record(stats, position=position, **self.about)
        if active is not None:
            record["active"] = active
        try:
            write_stats(self.path, record)
        except OSError as exc:
            log.warning("relay: cannot write %s: %s", self.path, exc)

    def write_final(self, stats: RelayStats, *, position: int) -> None:
        """The last record (not active), unless another relay took the file over."""
        if written_by(self.path) in (None, os.getpid()):
            self.write(stats, position=position, active=False)


async def consumer_lag(source: object, consumer: str, position: int) -> int | None:
    """Source events past the relay's position: the head (from the source's
    ``consumer_stats()``) minus the later of the saved offset and ``position``."""
    if not isinstance(source, ConsumerStatsSource):
        return None
    try:
        rows = await source.consumer_stats()
    except (PubSubError, OSError) as exc:
        log.debug("relay %s: no consumer stats (%s)", consumer, exc)
        return None
    for row in rows:
        if row.consumer == consumer and row.kind == "alkpubsub" and row.lag is not None:
            return max(row.offset + row.lag - max(row.offset, position), 0)
    return None


def remove_stats(path: Path) -> None:
    """Delete a stats file (tests, or an operator tidying up)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
