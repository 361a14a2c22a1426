"""Automatic pruning of ephemeral notifications.

Every ``honker://`` publish is a row of ``_honker_notifications``, and honker
never deletes them: a 1M-event run left a 212 MB file. Live subscribers need a
row only until their watcher has read it (milliseconds; at worst the 5 s
fallback poll, or as long as a process's event loop is blocked), so each
process that writes a database deletes notifications once they are older than
``notify_retention`` seconds (default :data:`DEFAULT_NOTIFY_RETENTION`, 0 turns
it off), on its writer thread, never on the event loop:

- Age is measured on this process's monotonic clock, not by ``created_at``
  (which any client may write, or a clock step may move): about every
  ``interval`` seconds the pruner notes the table's highest id; a row is deleted
  once an id at least as high was noted ``retention`` seconds ago. Rows left by
  earlier runs are therefore deleted ``retention`` seconds after a writer starts.
- A row a watcher of this process has not read yet is never deleted, however old.
  A live subscriber in another process whose loop stalls longer than the
  retention can miss rows; raise ``notify_retention`` if that can happen.
- One pass deletes at most :data:`PRUNE_BATCH` rows in one short transaction
  (median 2.9 ms measured; 5000 rows took 13.7 ms). After each batch of commits
  the writer runs passes for up to twice the rows it just wrote, and passes
  follow each other while it is idle, so pruning (~340k rows/s) outruns
  publishing (~150k rows/s at most here) while publishes wait for at most the
  passes their own batch paid for.

Freed pages are reused by later inserts, so the file stops growing at its
high-water mark; it does not shrink without ``VACUUM`` (see decision record 003
for why incremental auto_vacuum is not used).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from alkpubsub.errors import PubSubError

from .transaction import StoreTransaction

if TYPE_CHECKING:
    import honker

    from .gate import WriteGate

DEFAULT_NOTIFY_RETENTION = 60.0
"""Seconds a notification is kept; far longer than any live reader needs it."""
PRUNE_BATCH = 1000
"""Most rows one pass deletes (one transaction)."""

HIGHEST_ID = "SELECT COALESCE(MAX(id), 0) AS m FROM _honker_notifications"
"""The query whose answer :meth:`NotificationPruner.plan` needs (a read, no lock)."""
_DELETE = (
    "DELETE FROM _honker_notifications WHERE id IN "
    "(SELECT id FROM _honker_notifications WHERE id <= ? ORDER BY id LIMIT ?)"
)


def prune_interval(retention: float) -> float:
    """Seconds between passes: a tenth of the retention, within 0.05..10 s."""
    return min(max(retention / 10, 0.05), 10.0)


class NotificationPruner:
    """Decides when notifications are old enough and deletes them in bounded passes.
    Used by one writer thread; ``due`` may be asked from any thread."""

    def __init__(self, retention: float, batch: int = PRUNE_BATCH) -> None:
        self.retention = retention
        self.interval = prune_interval(retention)
        self.batch = batch
        self._seen: deque[tuple[float, int]] = deque()  # (monotonic time, highest id then)
        self._pruned = 0  # every id up to here is gone (or was never ours to keep)
        self._next = 0.0
        self.deleted = 0
        """Rows deleted so far."""
        self.passes = 0
        """Passes run so far (including those that found nothing old enough)."""

    def due(self, now: float) -> bool:
        """True when a pass should run at monotonic time ``now``."""
        return now >= self._next

    def wait(self, now: float) -> float | None:
        """Seconds until the next pass that can delete something already written,
        or None when nothing noted is left to delete (then only a commit needs one)."""
        if not self._seen or self._seen[-1][1] <= self._pruned:
            return None
        return max(self._next - now, 0.0)

    def plan(self, now: float, highest: int, unread_after: int | None) -> int | None:
        """Note ``highest`` (the table's highest id at monotonic time ``now``) and
        return the id up to which rows may be deleted now, or None when a pass
        would find nothing. ``unread_after`` is the lowest id up to which every
        watcher of this process has read (None if none reads notifications)."""
        self.passes += 1
        seen = self._seen
        if not seen or highest > seen[-1][1]:
            seen.append((now, highest))
        cutoff = now - self.retention
        while len(seen) >= 2 and seen[1][0] <= cutoff:
            seen.popleft()
        bound = seen[0][1] if seen[0][0] <= cutoff else 0
        if unread_after is not None:
            bound = min(bound, unread_after)
        if bound <= self._pruned:
            self._next = now + self.interval
            return None
        return bound

    def delete(self, tx: StoreTransaction, now: float, bound: int) -> int:
        """Delete at most :attr:`batch` rows with ids up to ``bound`` inside ``tx``."""
        tx.execute(_DELETE, [bound, self.batch])
        count = int(tx.query("SELECT changes() AS n")[0]["n"])
        self.deleted += count
        if count < self.batch:
            self._pruned = bound
            self._next = now + self.interval
        else:
            self._next = now  # more are due: the next pass follows after queued commits
        return count

    def failed(self, now: float) -> None:
        """A pass could not run (e.g. the disk is full): try again one interval later."""
        self._next = now + self.interval


def run_passes(
    pruner: NotificationPruner,
    db: honker.Database,
    gate: WriteGate,
    *,
    unread_after: Callable[[], int | None],
    lost: Callable[[], bool],
    budget: int,
) -> tuple[int, Exception | None]:
    """On the writer thread: passes while due, until about ``budget`` rows are
    deleted, each in its own short transaction. Returns the rows deleted and the
    error that ended the passes early (they are retried one interval later)."""
    deleted = 0
    while deleted < budget:
        now = time.monotonic()
        if not pruner.due(now):
            break
        if lost():
            pruner.failed(now)
            break
        try:
            # Read first (reader pool, no lock): most passes find nothing to delete
            # and then need no write transaction at all.
            highest = int(db.query(HIGHEST_ID)[0]["m"])
            bound = pruner.plan(now, highest, unread_after())
            if bound is None:
                break
            gate.acquire()
        except PubSubError:
            pruner.failed(now)  # another writer is busy for long: publishes come first
            break
        except Exception as exc:
            pruner.failed(now)
            return deleted, exc
        try:
            with db.transaction() as htx:
                count = pruner.delete(StoreTransaction(htx, ""), now, bound)
        except Exception as exc:  # e.g. the disk is full
            pruner.failed(now)
            return deleted, exc
        finally:
            gate.release()
        deleted += count
        if count == 0:
            break
    return deleted, None
