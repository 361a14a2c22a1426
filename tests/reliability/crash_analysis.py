"""Accounting for the crash scenario: what was sent, processed, lost, duplicated.

:class:`Ledger` folds in the children's record lines (``crash_records``) as
they appear; :meth:`Ledger.outcome` turns them into an :class:`Outcome`, whose
fields the test asserts on and whose :meth:`Outcome.line` is the printed figure.
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Crash:
    """One SIGKILL and the restart after it (times are ``time.monotonic()``)."""

    what: str
    """``consumer``, ``publisher``, ``broker``, or ``file`` (every Honker process at once)."""
    at: float
    """When the SIGKILL was sent."""
    back: float
    """When the replacement was started (a child spawned, or the broker serving again)."""
    first_delivery: float | None = None
    """The first event processed (publisher: accepted) at or after ``back``."""
    duplicates: int = 0
    """Duplicates this crash explains best (see :func:`_nearest`)."""

    @property
    def resume(self) -> float | None:
        """Seconds from ``back`` to the first delivery after it."""
        return None if self.first_delivery is None else self.first_delivery - self.back


@dataclass
class Outcome:
    """The accounting of one run."""

    sent: int
    """Events a ``publish_many`` call returned (accepted)."""
    unconfirmed: int
    """Events processed that no returned call reported (from a killed or failed call)."""
    lost: list[str]
    """Accepted event ids never processed."""
    duplicates: dict[str, list[float]]
    """``id@offset`` -> every time it was processed, for the deliveries of one
    stored event processed more than once (redeliveries)."""
    stored_twice: int
    """Event ids stored more than once (at distinct offsets): a publish the client
    retried after the broker took it but the reply was lost."""
    not_whole: int
    """Processed events whose topic or payload differ from what was published."""
    strays: list[int]
    """Unconfirmed events whose number no unreturned call carried."""
    crashes: list[Crash]
    redelivered: int
    """``stats.redelivered`` summed over the consumer processes (last report of each)."""
    malformed: int
    """``stats.malformed`` summed likewise."""
    republished: int
    unreturned_calls: int = 0
    """``publish_many`` calls that raised or were killed before returning."""
    reordered: int = 0
    """Events whose number first arrived after a higher number had reached the
    same consumer process (publish order broken, e.g. a crashed consumer's
    events handed to its successor after newer ones)."""
    """Event numbers that exist under more than one id (a batch retried after a
    failed or killed call that did store some events)."""
    ages: dict[str, float] = field(default_factory=dict)
    """Duplicate id -> seconds between its first processing and the crash that
    explains it (0 when processed after the kill, before delivery resumed)."""

    def unexplained(self, window: float) -> list[str]:
        """Duplicate ids no crash explains within ``window`` seconds."""
        return [i for i, age in self.ages.items() if age > window]

    def details(self) -> str:
        """Every crash and duplicate with its times, for a record next to the run."""
        rows = [
            f"crash {c.what} at={c.at:.6f} back={c.back:.6f} first_delivery={c.first_delivery}"
            for c in self.crashes
        ]
        rows += [
            f"dup {i} age={self.ages[i]:.6f} times={' '.join(f'{t:.6f}' for t in ts)}"
            for i, ts in sorted(self.duplicates.items(), key=lambda item: min(item[1]))
        ]
        return "\n".join(rows) + "\n"

    def line(self, name: str, window: float, seed: int) -> str:
        """The ``RELIABILITY`` figure for this run."""
        resumes: dict[str, list[str]] = defaultdict(list)
        for crash in self.crashes:
            resumes[crash.what].append("-" if crash.resume is None else f"{crash.resume:.2f}s")
        per_crash = [f"{c.what}:{c.duplicates}" for c in self.crashes]
        worst = max(self.ages.values(), default=0.0)
        return (
            f"RELIABILITY {name} crashes (consumer x3, publisher x1, "
            f"{'file holders' if 'file' in resumes else 'broker'} x2): "
            f"sent={self.sent} unconfirmed={self.unconfirmed} (of {self.unreturned_calls} calls "
            f"that never returned) lost={len(self.lost)} "
            f"dup={len(self.duplicates)} ({' '.join(per_crash)}) "
            f"stored_twice={self.stored_twice} "
            f"window={worst * 1000:.0f}ms (bound {window * 1000:.0f}ms) "
            f"reordered={self.reordered} redelivered={self.redelivered} "
            f"republished={self.republished} "
            f"first_delivery_after_restart="
            f"{' '.join(f'{k}=' + ','.join(v) for k, v in resumes.items())} seed={seed}"
        )


class Ledger:
    """What the children recorded so far."""

    def __init__(self) -> None:
        self.ready: dict[str, float] = {}
        self.processed: dict[str, list[float]] = {}  # by event id
        self.deliveries: dict[str, list[float]] = {}  # by id@offset: one stored copy
        self.copies: dict[str, set[str]] = {}  # event id -> offsets it was seen at
        self.numbers: dict[str, int] = {}
        self.reordered = 0
        self._highest: dict[str, int] = {}  # consumer process -> highest number processed
        self._seen: set[int] = set()  # numbers processed, under any id
        self.not_whole = 0
        self.stats: dict[str, dict[str, Any]] = {}
        self.accepted: dict[str, int] = {}
        self.accept_times: list[float] = []
        self.attempts: list[tuple[int, int]] = []  # calls that never returned events
        self._pending: dict[str, tuple[int, int, float]] = {}  # publisher -> call in flight
        self.published_all = False
        self._next = 0

    # -- folding in records ---------------------------------------------------

    def consumer_line(self, child: str, words: list[str]) -> None:
        """One line of a consumer's record file."""
        kind = words[0]
        if kind == "ready":
            self.ready[child] = float(words[1])
        elif kind == "event":
            n, event_id, offset, at = int(words[1]), words[2], words[3], float(words[4])
            whole = words[5]
            self.processed.setdefault(event_id, []).append(at)
            self.deliveries.setdefault(f"{event_id}@{offset}", []).append(at)
            self.copies.setdefault(event_id, set()).add(offset)
            if n not in self._seen and n < self._highest.get(child, -1):
                self.reordered += 1  # a number seen under another id is a republish
            self._seen.add(n)
            self._highest[child] = max(n, self._highest.get(child, -1))
            self.numbers[event_id] = n
            self.not_whole += whole != "1"
        elif kind == "stats":
            self.stats[child] = json.loads(words[1])

    def publisher_line(self, child: str, words: list[str]) -> None:
        """One line of a publisher's record file."""
        kind = words[0]
        if kind == "begin":
            self._pending[child] = (int(words[1]), int(words[2]), float(words[3]))
        elif kind == "accepted":
            first, count = int(words[1]), int(words[2])
            ids = words[4].split(",")
            assert len(ids) == count, f"{child}: {count} events published, {len(ids)} ids"
            self.accepted.update(zip(ids, range(first, first + count), strict=True))
            self.accept_times.append(float(words[3]))
            self._next = max(self._next, first + count)
            self._pending.pop(child, None)
        elif kind == "failed":
            first, count, _ = self._pending.pop(child)
            self.attempts.append((first, count))
        elif kind == "done":
            self.published_all = True

    # -- questions while running ------------------------------------------------

    def is_ready(self, child: str) -> bool:
        """Whether the consumer ``child`` reported its subscription live."""
        return child in self.ready

    def in_flight(self, publisher: str) -> float | None:
        """When ``publisher``'s unfinished ``publish_many`` call began, if any."""
        pending = self._pending.get(publisher)
        return None if pending is None else pending[2]

    def next_to_publish(self) -> int:
        """The first event number no returned call covered (publishing is in order)."""
        return self._next

    def all_processed(self) -> bool:
        """Whether every accepted event was processed at least once."""
        return all(i in self.processed for i in self.accepted)

    def progress(self) -> str:
        """A one-line summary for timeout messages."""
        missing = sum(1 for i in self.accepted if i not in self.processed)
        return (
            f"accepted {len(self.accepted)}, processed {len(self.processed)}, "
            f"accepted but not processed {missing}, publishing done: {self.published_all}"
        )

    # -- the accounting ---------------------------------------------------------

    def outcome(self, crashes: list[Crash]) -> Outcome:
        """Account for the run, given the crashes it went through."""
        attempts = self.attempts + [(f, c) for f, c, _ in self._pending.values()]
        unconfirmed = [i for i in self.processed if i not in self.accepted]
        strays = [
            self.numbers[i]
            for i in unconfirmed
            if not any(f <= self.numbers[i] < f + c for f, c in attempts)
        ]
        times = sorted(t for ts in self.processed.values() for t in ts)
        accepts = sorted(self.accept_times)
        for crash in crashes:
            series = accepts if crash.what == "publisher" else times
            k = bisect.bisect_left(series, crash.back)
            crash.first_delivery = series[k] if k < len(series) else None
        duplicates = {i: ts for i, ts in self.deliveries.items() if len(ts) > 1}
        ages: dict[str, float] = {}
        for event_id, ts in duplicates.items():
            nearest, ages[event_id] = _nearest(min(ts), crashes)
            if nearest is not None:
                nearest.duplicates += 1
        per_number: dict[int, int] = defaultdict(int)
        for n in self.numbers.values():
            per_number[n] += 1
        return Outcome(
            sent=len(self.accepted),
            unconfirmed=len(unconfirmed),
            lost=[i for i in self.accepted if i not in self.processed],
            duplicates=duplicates,
            stored_twice=sum(1 for offsets in self.copies.values() if len(offsets) > 1),
            not_whole=self.not_whole,
            strays=strays,
            crashes=crashes,
            redelivered=sum(s.get("redelivered", 0) for s in self.stats.values()),
            malformed=sum(s.get("malformed", 0) for s in self.stats.values()),
            republished=sum(1 for count in per_number.values() if count > 1),
            reordered=self.reordered,
            unreturned_calls=len(attempts),
            ages=ages,
        )


def _nearest(first: float, crashes: list[Crash]) -> tuple[Crash | None, float]:
    """The crash that best explains a duplicate first processed at ``first``, and
    the seconds from that processing to the kill: 0 if it happened after a kill,
    before delivery resumed; infinity (and no crash) if no crash came after it."""
    best: tuple[Crash | None, float] = (None, float("inf"))
    for crash in crashes:
        if crash.what == "publisher":
            continue  # a publisher crash cannot make a consumer see an event twice
        resumed = max(crash.at, crash.first_delivery or crash.at)
        if crash.at <= first <= resumed:
            return crash, 0.0
        if first < crash.at and crash.at - first < best[1]:
            best = (crash, crash.at - first)
    return best
