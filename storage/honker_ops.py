"""honker's queues, locks and scheduler inside a store transaction.

honker's Python objects (``db.queue(name).enqueue``, ``db.lock``,
``Scheduler.add``) open a transaction of their own unless given ``tx=``, and
wait for SQLite's lock with the GIL held. Here the same operations are the SQL
functions every honker binding calls (``honker_enqueue``,
``honker_lock_acquire``/``renew``/``release``, ``honker_scheduler_register``),
run on the store transaction's connection: they commit with its rows and
events, roll back with them, and go through the store's write gate. A worker
using honker's own API (in any process) sees a job only once it committed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from alkpubsub.errors import ConfigError, PayloadError
from alkpubsub.event import encode_payload
from alkpubsub.limits import MAX_PAYLOAD_BYTES

DEFAULT_MAX_ATTEMPTS = 3
"""Attempts of a job before honker moves it to ``_honker_dead`` (honker's default)."""

Query = Callable[[str, list[Any]], list[dict[str, Any]]]

ENQUEUE = "SELECT honker_enqueue(?, ?, ?, ?, ?, ?, ?) AS id"
LOCK_ACQUIRE = "SELECT honker_lock_acquire(?, ?, ?) AS r"
LOCK_RENEW = "SELECT honker_lock_renew(?, ?, ?) AS r"
LOCK_RELEASE = "SELECT honker_lock_release(?, ?) AS r"
SCHEDULE = "SELECT honker_scheduler_register(?, ?, ?, ?, ?, ?, ?)"
UNSCHEDULE = "SELECT honker_scheduler_unregister(?) AS n"


def _name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 256 or "\x00" in value:
        raise ConfigError(f"{kind} name {value!r} must be 1..256 characters of text")
    return value


MAX_SECONDS = 100 * 366 * 86_400
"""Longest delay, expiry or unix time accepted (a century: ``now + value`` stays
far inside SQLite's 64-bit integers)."""
MAX_INT32 = 2**31 - 1


def _seconds(what: str, value: float | None, high: float = MAX_SECONDS) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what}={value!r} must be a number of seconds")
    if not 0 <= value <= high:
        raise ConfigError(f"{what}={value!r} must be 0..{high:g} seconds")
    return int(value)


def _count(what: str, value: int, low: int, high: int = MAX_INT32) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{what}={value!r} must be an int in {low}..{high}")
    return value


def _json(payload: Any, what: str) -> str:
    try:
        return encode_payload(payload, topic=what, max_bytes=MAX_PAYLOAD_BYTES).decode()
    except PayloadError as exc:
        raise PayloadError(f"{what}: {exc}") from None


def enqueue_args(
    queue: str,
    payload: Any,
    *,
    delay: float | None,
    run_at: float | None,
    priority: int,
    expires: float | None,
    max_attempts: int,
) -> list[Any]:
    """Checked arguments of ``honker_enqueue``."""
    return [
        _name("queue", queue),
        _json(payload, f"job for queue {queue!r}"),
        _seconds("run_at", run_at, 2 * MAX_SECONDS),
        _seconds("delay", delay),
        _count("priority", priority, -(2**31)),
        _count("max_attempts", max_attempts, 1),
        _seconds("expires", expires),
    ]


def schedule_name(name: str) -> str:
    """A checked schedule name."""
    return _name("schedule", name)


def lock_args(name: str, owner: str, ttl: int | None = None) -> list[Any]:
    """Checked arguments of the ``honker_lock_*`` functions."""
    args: list[Any] = [_name("lock", name), _name("lock owner", owner)]
    if ttl is not None:
        args.append(_count("ttl", ttl, 1, MAX_SECONDS))
    return args


def schedule_args(
    name: str,
    *,
    queue: str,
    cron: str,
    payload: Any,
    priority: int,
    expires: float | None,
    max_attempts: int,
) -> list[Any]:
    """Checked arguments of ``honker_scheduler_register``; ``cron`` is a 5- or
    6-field cron expression or ``@every <n><unit>`` (checked by honker)."""
    from honker import CronSchedule

    try:
        expr = CronSchedule(cron.strip() if isinstance(cron, str) else cron).expr
    except Exception as exc:  # honker's parser: ValueError or its own
        raise ConfigError(
            f"cron={cron!r} is not a schedule: use a cron expression ('*/5 * * * *') "
            f"or '@every 30s' ({exc})"
        ) from None
    return [
        _name("schedule", name),
        _name("queue", queue),
        expr,
        _json(payload, f"payload of schedule {name!r}"),
        _count("priority", priority, -(2**31)),
        _seconds("expires", expires),
        _count("max_attempts", max_attempts, 1),
    ]
