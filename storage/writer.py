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
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from alkpubsub.errors import PublishError, PubSubError

from .transaction import INSERT_NOTIFICATION, INSERT_STREAM, StoreTransaction

if TYPE_CHECKING:
    from .store import SharedDatabase

MAX_BATCH_JOBS = 4096
INLINE_MAX_ROWS = 32
"""Largest batch committed on the event loop (about 0.3 ms uncontended)."""


@dataclass(slots=True)
class WriterStats:
    """Counters of one database's group-commit writer (for benchmarks and ``stats``)."""

    commits: int = 0
    """Transactions committed (group commits, inline ones included, and sessions)."""
    jobs: int = 0
    """Write requests committed (one ``publish``, one ``publish_many``, one ack save...)."""
    rows: int = 0
    """Stream rows and notifications written."""
    largest_batch: int = 0
    """Most jobs committed in one transaction."""
    failed_jobs: int = 0
    """Jobs that raised (their callers got the error)."""
    inline_commits: int = 0
    """Commits made on the event loop (uncontended, small); the rest ran on the thread."""

    @property
    def mean_batch(self) -> float:
        """Jobs per commit."""
        return self.jobs / self.commits if self.commits else 0.0

    def as_dict(self) -> dict[str, float]:
        """A plain dict, including ``mean_batch``."""
        return {**asdict(self), "mean_batch": self.mean_batch}


# Job kinds
STREAM = 1  # arg: (stream, [(key, envelope_text), ...]) -> list of offsets
NOTIFY = 2  # arg: [(channel, envelope_text), ...] -> None
CALL = 3  # arg: fn(StoreTransaction) -> result
SESSION = 4  # arg: Session


class Job:
    """One write request. ``inline`` marks short internal work that may commit on
    the event loop (never a user's function of unknown length)."""

    __slots__ = ("arg", "future", "inline", "kind", "loop", "origin")

    def __init__(
        self,
        kind: int,
        arg: Any,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        origin: str,
        inline: bool = True,
    ) -> None:
        self.kind = kind
        self.arg = arg
        self.loop = loop
        self.future = future
        self.origin = origin
        self.inline = inline

    @property
    def rows(self) -> int:
        if self.kind == STREAM:
            return len(self.arg[1])
        if self.kind == NOTIFY:
            return len(self.arg)
        return 1


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_STOP = object()
_END = object()


class Session:
    """An ``atransaction()`` running on the writer thread: it holds the write
    transaction open and runs the operations the coroutine sends it, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: str) -> None:
        self.loop = loop
        self.origin = origin
        self.begun: asyncio.Future[None] = loop.create_future()
        self.ops: queue.SimpleQueue[tuple[object, Any, asyncio.Future[Any]]] = queue.SimpleQueue()

    def run(self, fn: Callable[[StoreTransaction], Any]) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self.ops.put((fn, None, future))
        return future

    def end(self, commit: bool) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self.ops.put((_END, commit, future))
        return future


class _Rollback(Exception):
    pass


class _MergedInsertFailed(Exception):
    """A multi-row insert spanning several jobs failed: retry job by job."""


_CHUNKS = (64, 8, 1)


def _multi_row(sql: str, columns: int, rows: int) -> str:
    return sql + (", (" + ", ".join("?" * columns) + ")") * (rows - 1)


_STREAM_SQL = {n: (_multi_row(INSERT_STREAM, 3, n), 3) for n in _CHUNKS}
_NOTIFY_SQL = {n: (_multi_row(INSERT_NOTIFICATION, 2, n), 2) for n in _CHUNKS}


def _insert_rows(
    execute: Callable[..., Any], sqls: dict[int, tuple[str, int]], flat: list[Any]
) -> int:
    """Insert the rows whose parameters are ``flat``, in statements of 64, 8 and 1
    rows (few distinct statements, so honker's statement cache keeps them all).
    Returns the number of rows."""
    width = sqls[1][1]
    total = len(flat) // width
    done = 0
    for size in _CHUNKS:
        sql, _ = sqls[size]
        step = size * width
        while total - done >= size:
            start = done * width
            execute(sql, flat[start : start + step])
            done += size
    return total


class _JobError(Exception):
    """Job ``index`` of a batch raised ``error``."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


def settle_futures(
    items: list[tuple[asyncio.Future[Any], Any]], wake: Callable[[], None] | None
) -> None:
    """On the futures' loop: set each result (or failure), then wake that loop's watcher."""
    for future, result in items:
        if future.done():
            continue
        if isinstance(result, _Failed):
            future.set_exception(result.error)
        else:
            future.set_result(result)
    if wake is not None:
        wake()


def _send(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop was closed; nobody is waiting
        loop.call_soon_threadsafe(settle_futures, [(future, result)], None)


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
            if committed and not any(isinstance(r, _Failed) for r in results):
                # The common case, settled right here: every job came from this loop.
                for job, result in zip(jobs, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(result)
                self._shared.wake_watchers(jobs[0].loop)
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
        stop = False
        while not stop:
            first = q.get()
            if first is _STOP:
                break
            batch: list[Job] = [first]
            while len(batch) < MAX_BATCH_JOBS:
                try:
                    job = q.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
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
        self._drain_after_stop()

    def _drain_after_stop(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, Job):
                closed = PubSubError(f"the store for {self._shared.path!r} was closed")
                if job.kind == SESSION:
                    _send(job.loop, job.arg.begun, _Failed(closed))
                else:
                    _send(job.loop, job.future, _Failed(closed))

    def _commit(self, batch: list[Job]) -> None:
        gate = self._shared.gate
        try:
            gate.acquire()
        except PubSubError as exc:
            self._finish(batch, [_Failed(exc)] * len(batch), committed=False)
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
                results[remaining.pop(failed.index)] = _Failed(failed.error)
                continue
            except Exception as exc:  # BEGIN or COMMIT failed: nothing was stored
                for i in remaining:
                    results[i] = _Failed(exc)
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
                    sqls = _STREAM_SQL
                else:
                    for each in batch[i:end]:
                        for channel, text in each.arg:
                            flat += (channel, text)
                    sqls = _NOTIFY_SQL
                try:
                    n = _insert_rows(execute, sqls, flat)
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
            if isinstance(result, _Failed):
                self.stats.failed_jobs += 1
                if job.kind != CALL and not isinstance(result.error, PubSubError):
                    error = PublishError(
                        f"writing to {self._shared.path!r} failed: {result.error}; "
                        "nothing of this publish was stored"
                    )
                    error.__cause__ = result.error
                    result = _Failed(error)
            by_loop.setdefault(job.loop, []).append((job.future, result))
        self._shared.after_commit(by_loop, committed)

    def _session(self, job: Job) -> None:
        session: Session = job.arg
        gate = self._shared.gate
        try:
            gate.acquire()
        except PubSubError as exc:
            _send(session.loop, session.begun, _Failed(exc))
            return
        committed = False
        end_future: asyncio.Future[Any] | None = None
        try:
            with self._shared.db.transaction() as htx:
                tx = StoreTransaction(htx, session.origin)
                _send(session.loop, session.begun, None)
                while True:
                    try:
                        fn, commit, future = session.ops.get(timeout=1.0)
                    except queue.Empty:
                        if session.loop.is_closed():
                            raise _Rollback() from None
                        continue
                    if fn is _END:
                        end_future = future
                        if commit:
                            break
                        raise _Rollback()
                    try:
                        result = fn(tx)  # type: ignore[operator]
                    except Exception as exc:
                        result = _Failed(exc)
                    _send(session.loop, future, result)
            committed = True
            self.stats.commits += 1
            self.stats.jobs += 1
        except _Rollback:
            pass
        except Exception as exc:
            if end_future is not None:
                _send(session.loop, end_future, _Failed(exc))
                end_future = None
            else:
                _send(session.loop, session.begun, _Failed(exc))
        finally:
            gate.release()
        if end_future is not None:
            _send(session.loop, end_future, None)
        if committed:
            self._shared.after_commit({}, True)
