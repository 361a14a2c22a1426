"""Retention: pruning notifications and stream rows.

Honker never prunes on its own. ``store.prune(older_than=..., keep_last=...)``
deletes notifications and stream rows that are older than ``older_than``
seconds OR beyond the newest ``keep_last`` (counted per stream). Stream rows a
durable consumer has not consumed yet (offset above the slowest registered
consumer's saved offset for that stream) are kept unless ``force=True``.
Run it on a schedule, e.g. with honker's scheduler or a cron job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from alkpubsub.errors import ConfigError

if TYPE_CHECKING:
    from .transaction import StoreTransaction


@dataclass(frozen=True, slots=True)
class PruneCounts:
    """What one prune deleted."""

    notifications: int = 0
    stream_rows: dict[str, int] = field(default_factory=dict)
    """Rows deleted per stream name."""
    kept_for_consumers: dict[str, int] = field(default_factory=dict)
    """Per stream, the slowest consumer's offset that limited pruning (absent if none did)."""

    @property
    def total(self) -> int:
        """Notifications plus stream rows deleted."""
        return self.notifications + sum(self.stream_rows.values())


def _check(older_than: float | None, keep_last: int | None) -> None:
    if older_than is None and keep_last is None:
        raise ConfigError("prune() needs older_than= (seconds) or keep_last= (rows), or both")
    if older_than is not None and (isinstance(older_than, bool) or older_than < 0):
        raise ConfigError(f"older_than={older_than!r} must be seconds >= 0")
    if keep_last is not None and (
        isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0
    ):
        raise ConfigError(f"keep_last={keep_last!r} must be an int >= 0")


def prune(
    tx: StoreTransaction,
    *,
    older_than: float | None = None,
    keep_last: int | None = None,
    force: bool = False,
) -> PruneCounts:
    """Prune inside ``tx`` (see the module docstring); return what was deleted."""
    _check(older_than, keep_last)
    notifications = _prune_notifications(tx, older_than, keep_last)
    deleted: dict[str, int] = {}
    floors: dict[str, int] = {}
    streams = [row["topic"] for row in tx.query("SELECT DISTINCT topic FROM _honker_stream")]
    for stream in streams:
        conditions: list[str] = []
        params: list[object] = [stream]
        if older_than is not None:
            conditions.append("created_at < unixepoch() - ?")
            params.append(older_than)
        if keep_last is not None:
            conditions.append(
                "offset <= (SELECT offset FROM _honker_stream WHERE topic = ?1 "
                "ORDER BY offset DESC LIMIT 1 OFFSET ?)"
            )
            params.append(keep_last)
        where = f"topic = ?1 AND ({' OR '.join(conditions)})"
        if not force:
            floor = tx.query(
                "SELECT MIN(offset) AS m FROM _honker_stream_consumers WHERE topic = ?", [stream]
            )[0]["m"]
            if floor is not None:
                where += " AND offset <= ?"
                params.append(int(floor))
                floors[stream] = int(floor)
        # Numbered and anonymous parameters mix: ?1 is the stream, the rest follow in order.
        tx.execute(f"DELETE FROM _honker_stream WHERE {where}", params)
        count = int(tx.query("SELECT changes() AS n")[0]["n"])
        if count:
            deleted[stream] = count
    return PruneCounts(notifications, deleted, floors)


def _prune_notifications(
    tx: StoreTransaction, older_than: float | None, keep_last: int | None
) -> int:
    conditions: list[str] = []
    params: list[object] = []
    if older_than is not None:
        conditions.append("created_at < unixepoch() - ?")
        params.append(older_than)
    if keep_last is not None:
        conditions.append(
            "id <= (SELECT id FROM _honker_notifications ORDER BY id DESC LIMIT 1 OFFSET ?)"
        )
        params.append(keep_last)
    tx.execute(f"DELETE FROM _honker_notifications WHERE {' OR '.join(conditions)}", params)
    return int(tx.query("SELECT changes() AS n")[0]["n"])
