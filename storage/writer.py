"""Group commit: one writer per Honker database per process.

honker's writes are synchronous, and while SQLite waits for a lock held by
another process honker keeps the GIL, which would freeze the event loop. So:

- :class:`~alkpubsub.storage.gate.WriteGate` serialises alkpubsub's writers to
  one file before they touch SQLite, waiting with the GIL released.
- :class:`GroupCommitWriter` commits every write queued in one event-loop turn
  in ONE transaction: on the loop itself when that is cheap (nothing queued for
  the thread, the gate free at once, at most ``INLINE_MAX_ROWS`` rows), else on
  its thread, which also takes everything queued while it was busy and settles
  each waiter's future with one ``call_soon_threadsafe`` per event loop.
  A job that raises is dropped from the batch and the rest commit without it.
- Between batches the thread runs the notification pruner's bounded passes
  (see :mod:`alkpubsub.storage.pruning`); while rows are left to prune it wakes
  for them even when nothing is published.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from alkpubsub.errors import ConnectionLost, PublishError, PubSubError

from .jobs import (
    CALL,
    END,
    NOTIFY,
    SESSION,
    STREAM,
    Failed,
    Job,
    Session,
    WriterStats,
    send,
)
from .pruning import run_passes
from .transaction import NOTIFY_SQL, STREAM_SQL, StoreTransaction, insert_rows

if TYPE_CHECKING:
    from .pruning import NotificationPruner
    from .shared import SharedDatabase

log = logging.getLogger("alkpubsub.storage")

MAX_BATCH_JOBS = 4096
INLINE_MAX_ROWS = 32
"""Largest batch committed on the event loop (about 0.3 ms uncontended)."""


_STOP = object()
_PRUNE = object()


class _Rollback(Exception):
    pass


class _MergedInsertFailed(Exception):
    """A multi-row insert spanning several jobs failed: retry job by job."""


class _JobError(Exception):
    """Job ``index`` of a batch raised ``error``."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class GroupCommitWriter:
    """The writer thread of one database (started on first use)."""

    def __init__(self, shared: SharedDatabase) -> None:
        self._shared = shared
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopped = False
        self._outstanding = 0
        self._count_lock = threading.Lock()
        self._prune_requested = False
        self.stats = WriterStats()

    def dispatch(self, jobs: list[Job]) -> None:
        """Commit ``jobs`` (all from the calling event loop's thread) in one transaction.

        When nothing is queued for the writer thread, the file's write lock is
        free right now and the batch is small, the commit runs here, on the
        loop: an uncontended commit of a few rows costs less than the two thread
        hops it would take (see the decision record). Otherwise the writer
        thread takes the jobs; any waiting happens there.
        """
        if (
            self._outstanding == 0
            and all(job.inline for job in jobs)
            and sum(job.rows for job in jobs) <= INLINE_MAX_ROWS
            and self._shared.gate.try_acquire()
        ):
            try:
                results, committed = self._commit_locked(jobs)
            finally:
                self._shared.gate.release()
            self.stats.inline_commits += 1
            if committed and not any(isinstance(r, Failed) for r in results):
                # The common case, settled right here: every job came from this loop.
                for job, result in zip(jobs, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(result)
                self._shared.wake_watchers(jobs[0].loop)
                self.prune_if_due()
            else:
                self._finish(jobs, results, committed)
            return
        for job in jobs:
            self.submit(job)

    def submit(self, job: Job) -> None:
        """Queue ``job`` for the writer thread (thread-safe)."""
        if self._thread is None:
            self._start()
        with self._count_lock:
            self._outstanding += 1
        self._queue.put(job)

    def prune_if_due(self) -> None:
        """After a commit: ask the thread for a pruning pass if one is due (~0.1 us)."""
        pruner = self._shared.pruner
        if pruner is None or self._prune_requested or not pruner.due(time.monotonic()):
            return
        self._prune_requested = True
        try:
            if self._thread is None:
                self._start()
        except PubSubError:
            return  # closing: no more passes
        self._queue.put(_PRUNE)

    def _start(self) -> None:
        with self._start_lock:
            if self._stopped:
                raise PubSubError(f"the store for {self._shared.path!r} is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"alkpubsub-writer:{self._shared.path}", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then end the thread."""
        with self._start_lock:
            self._stopped = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)

    # -- the thread -------------------------------------------------------

    def _run(self) -> None:
        q = self._queue
        pruner = self._shared.pruner
        stop = False
        while not stop:
            wait = pruner.wait(time.monotonic()) if pruner is not None else None
            try:
                first = q.get(timeout=wait)
            except queue.Empty:
                first = _PRUNE  # rows are waiting to be old enough, and nothing was published
            if first is _STOP:
                break
            batch: list[Job] = [] if first is _PRUNE else [first]
            while len(batch) < MAX_BATCH_JOBS:
                try:
                    job = q.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                if job is not _PRUNE:
                    batch.append(job)
            run: list[Job] = []
            for job in batch:
                if job.kind == SESSION:
                    if run:
                        self._commit(run)
                        run = []
                    self._session(job)
                else:
                    run.append(job)
            if run:
                self._commit(run)
            with self._count_lock:
                self._outstanding -= len(batch)
            if pruner is not None and pruner.due(time.monotonic()):
                # Delete up to twice what this batch wrote, so pruning keeps up
                # with any publishing rate (see pruning.py for the figures).
                self._prune(pruner, max(pruner.batch, 2 * sum(job.rows for job in batch)))
        self._drain_after_stop()

    def _prune(self, pruner: NotificationPruner, budget: int) -> None:
        self._prune_requested = False
        shared = self._shared
        deleted, error = run_passes(
            pruner,
            shared.db,
            shared.gate,
            unread_after=shared.unread_after,
            lost=lambda: shared.lost is not None,
            budget=budget,
        )
        self.stats.pruned_notifications += deleted
        if error is not None:
            self.stats.prune_failures += 1
            if self.stats.prune_failures == 1:
                log.warning("%s: pruning notifications failed (retried): %s", shared.path, error)

    def _drain_after_stop(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, Job):
                closed = PubSubError(f"the store for {self._shared.path!r} was closed")
                if job.kind == SESSION:
                    send(job.loop, job.arg.begun, Failed(closed))
                else:
                    send(job.loop, job.future, Failed(closed))

    def _commit(self, batch: list[Job]) -> None:
        lost = self._shared.lost
        if lost is not None:
            failed = Failed(ConnectionLost(str(lost)))
            self._finish(batch, [failed] * len(batch), committed=False)
            return
        gate = self._shared.gate
        try:
            gate.acquire()
        except PubSubError as exc:
            self._finish(batch, [Failed(exc)] * len(batch), committed=False)
            return
        try:
            results, committed = self._commit_locked(batch)
        finally:
            gate.release()
        self._finish(batch, results, committed)

    def _commit_locked(self, batch: list[Job]) -> tuple[list[Any], bool]:
        """Commit ``batch``; a job that raises is dropped and the rest retried in one
        transaction. Returns each job's result (or failure) and whether anything
        committed."""
        results: list[Any] = [None] * len(batch)
        remaining = list(range(len(batch)))
        merge = True
        while remaining:
            try:
                done = self._transact([batch[i] for i in remaining], merge)
            except _MergedInsertFailed:
                merge = False  # insert job by job to find the one that fails
                continue
            except _JobError as failed:
                results[remaining.pop(failed.index)] = Failed(failed.error)
                continue
            except Exception as exc:  # BEGIN or COMMIT failed: nothing was stored
                for i in remaining:
                    results[i] = Failed(exc)
                return results, False
            for i, result in zip(remaining, done, strict=True):
                results[i] = result
            return results, True
        return results, False

    def _transact(self, batch: list[Job], merge: bool = True) -> list[Any]:
        results: list[Any] = [None] * len(batch)
        rows = 0
        count = len(batch)
        with self._shared.db.transaction() as htx:
            execute = htx.execute
            i = 0
            while i < count:
                job = batch[i]
                kind = job.kind
                if kind == CALL:
                    try:
                        results[i] = job.arg(StoreTransaction(htx, job.origin))
                    except Exception as exc:
                        raise _JobError(i, exc) from exc  # rolls the batch back
                    i += 1
                    continue
                # A run of stream appends to one stream (or of notifications) is
                # written with multi-row INSERTs: one statement per 64 rows costs
                # less than one per row. Offsets come from last_insert_rowid():
                # AUTOINCREMENT gives consecutive rowids to back-to-back inserts.
                stream = job.arg[0] if kind == STREAM else None
                end = i + 1
                if merge:
                    while (
                        end < count
                        and batch[end].kind == kind
                        and (kind == NOTIFY or batch[end].arg[0] == stream)
                    ):
                        end += 1
                flat: list[Any] = []
                if kind == STREAM:
                    for each in batch[i:end]:
                        for key, text in each.arg[1]:
                            flat += (stream, key, text)
                    sqls = STREAM_SQL
                else:
                    for each in batch[i:end]:
                        for channel, text in each.arg:
                            flat += (channel, text)
                    sqls = NOTIFY_SQL
                try:
                    n = insert_rows(execute, sqls, flat)
                except Exception as exc:
                    if end - i > 1:
                        raise _MergedInsertFailed() from exc
                    raise _JobError(i, exc) from exc
                rows += n
                if kind == STREAM:
                    last = int(htx.query("SELECT last_insert_rowid() AS r")[0]["r"])
                    first = last - n + 1
                    for index in range(i, end):
                        k = len(batch[index].arg[1])
                        results[index] = list(range(first, first + k))
                        first += k
                i = end
        stats = self.stats
        stats.commits += 1
        stats.jobs += count
        stats.rows += rows
        stats.largest_batch = max(stats.largest_batch, count)
        return results

    def _finish(self, batch: list[Job], results: list[Any], committed: bool) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, Failed):
                self.stats.failed_jobs += 1
                if job.kind != CALL and not isinstance(result.error, PubSubError):
                    error = PublishError(
                        f"writing to {self._shared.path!r} failed: {result.error}; "
                        "nothing of this publish was stored"
                    )
                    error.__cause__ = result.error
                    result = Failed(error)
            by_loop.setdefault(job.loop, []).append((job.future, result))
        self._shared.after_commit(by_loop, committed)

    def _session(self, job: Job) -> None:
        session: Session = job.arg
        gate = self._shared.gate
        try:
            gate.acquire()
        except PubSubError as exc:
            send(session.loop, session.begun, Failed(exc))
            return
        committed = False
        end_future: asyncio.Future[Any] | None = None
        try:
            with self._shared.db.transaction() as htx:
                tx = StoreTransaction(htx, session.origin)
                send(session.loop, session.begun, None)
                while True:
                    try:
                        fn, commit, future = session.ops.get(timeout=1.0)
                    except queue.Empty:
                        if session.loop.is_closed():
                            raise _Rollback() from None
                        continue
                    if fn is END:
                        end_future = future
                        if commit:
                            break
                        raise _Rollback()
                    try:
                        result = fn(tx)  # type: ignore[operator]
                    except Exception as exc:
                        result = Failed(exc)
                    send(session.loop, future, result)
            committed = True
            self.stats.commits += 1
            self.stats.jobs += 1
        except _Rollback:
            pass
        except Exception as exc:
            if end_future is not None:
                send(session.loop, end_future, Failed(exc))
                end_future = None
            else:
                send(session.loop, session.begun, Failed(exc))
        finally:
            gate.release()
        if end_future is not None:
            send(session.loop, end_future, None)
        if committed:
            self._shared.after_commit({}, True)
