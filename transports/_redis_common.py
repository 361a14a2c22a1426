"""What the two Redis transports share: connection settings from the URL and
``Settings`` (credentials, TLS), the clients built from them, the mapping of
redis-py errors to alkpubsub errors, and the reconnect backoff.

Nothing here logs or formats a password: messages name the server by
``host:port/db`` only.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

from alkpubsub.config import ParsedUrl, Settings
from alkpubsub.errors import ConfigError, ConnectionLost

#: Errors that mean "the server is (for now) out of reach" (OSError covers
#: the built-in ConnectionError and TimeoutError, so asyncio timeouts too).
CONNECTION_ERRORS = (rex.ConnectionError, rex.TimeoutError, OSError)


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# Publishes ride over a short blip (a restart, a failover) before giving up.
PUBLISH_RETRIES = 2
PUBLISH_BACKOFF = ExponentialWithJitterBackoff(base=0.05, cap=0.5)


@dataclass(frozen=True)
class RedisTarget:
    """Where and how to connect. ``password`` is kept out of ``repr``."""

    scheme: str
    host: str
    port: int
    db: int
    username: str | None
    password: str | None = field(repr=False)
    tls: bool
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None

    @property
    def label(self) -> str:
        """The server as shown in names, logs and errors: never credentials."""
        return f"{self.scheme}://{self.host}:{self.port}/{self.db}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``rediss://`` (server certificate checked), else None."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def client(
        self,
        *,
        retries: int,
        connect_timeout: float,
        read_timeout: float = 10.0,
        health_check_interval: float = 0,
    ) -> aioredis.Redis:
        """A redis-py asyncio client (its own pool). With ``retries=0`` no
        error is retried or reconnected inside redis-py: the caller owns it."""
        retry = (
            Retry(PUBLISH_BACKOFF, retries)
            if retries > 0
            else Retry(NoBackoff(), 0, supported_errors=())
        )
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": read_timeout,
            "socket_keepalive": True,
            "health_check_interval": health_check_interval,
            "retry": retry,
            "decode_responses": False,
        }
        if self.tls:
            kwargs.update(
                ssl=True,
                ssl_ca_certs=self.tls_ca,
                ssl_certfile=self.tls_cert,
                ssl_keyfile=self.tls_key,
            )
        return aioredis.Redis(**kwargs)


def redis_target(parsed: ParsedUrl, settings: Settings | None) -> RedisTarget:
    """Read host, port, db, credentials and TLS files from ``parsed`` and
    ``settings`` (the URL's own credentials win)."""
    base = parsed.base_scheme
    if base not in ("redis", "rediss"):
        raise ConfigError(f"{parsed.redacted!r} is not a redis:// or rediss:// URL")
    db_text = parsed.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ConfigError(
            f"database {db_text!r} in {parsed.redacted!r} is not a number; use redis://host:6379/0"
        )
    username = parsed.username
    password = parsed.password
    if settings is not None and username is None and password is None:
        username = settings.username
        password = settings.password.get_secret_value() if settings.password else None
    tls = base == "rediss"

    def path(value: object) -> str | None:
        return str(value) if value is not None else None

    return RedisTarget(
        scheme=parsed.scheme,
        host=parsed.host or "localhost",
        port=parsed.port or 6379,
        db=int(db_text),
        username=username,
        password=password,
        tls=tls,
        tls_ca=path(settings.tls_ca) if tls and settings else None,
        tls_cert=path(settings.tls_cert) if tls and settings else None,
        tls_key=path(settings.tls_key) if tls and settings else None,
    )


def translate(exc: BaseException, target: RedisTarget, doing: str) -> BaseException:
    """The alkpubsub error for a redis-py error raised while ``doing``; or, when
    the calling task is being cancelled, the cancellation itself: redis-py can
    turn a cancellation that lands mid-command into a connection or timeout
    error, and a caller that retries on ConnectionLost would then never stop
    (seen once in CI: a cancelled publisher kept publishing for 10 s)."""
    task = asyncio.current_task() if _has_loop() else None
    if task is not None and task.cancelling():
        return asyncio.CancelledError()
    if isinstance(exc, rex.AuthenticationError | rex.NoPermissionError):
        return ConfigError(
            f"{target.label} refused the credentials while {doing} ({exc}); "
            "check the username/password in the URL or ALKPUBSUB_USERNAME/ALKPUBSUB_PASSWORD"
        )
    if isinstance(exc, rex.ResponseError) and "NOAUTH" in str(exc):
        return ConfigError(
            f"{target.label} requires a password ({doing}); put it in the URL "
            "(redis://:PASSWORD@host) or in ALKPUBSUB_PASSWORD"
        )
    return ConnectionLost(
        f"lost the connection to {target.label} while {doing} ({type(exc).__name__}: {exc}); "
        "the server may be restarting; retry later"
    )


def is_auth_error(exc: BaseException) -> bool:
    """True for errors that no reconnect will fix (wrong credentials)."""
    return isinstance(exc, rex.AuthenticationError | rex.NoPermissionError) or (
        isinstance(exc, rex.ResponseError) and "NOAUTH" in str(exc)
    )


class Backoff:
    """Reconnect pacing and the outage's deadline.

    The first retry goes at once, the next ones every 10-20 ms (jittered)
    while the outage is younger than ``FAST_FOR`` seconds: a restarting
    server is usually back within that, and on pub/sub every millisecond
    between its return and the resubscribe loses events (with the earlier
    50 ms..1 s doubling, 22-24 publishes per restart were lost). A refused
    connection costs microseconds. After ``FAST_FOR`` the pause doubles
    from 50 ms up to ``cap``, so a long outage is not hammered.
    """

    FAST_FOR = 5.0

    def __init__(self, limit: float, cap: float = 1.0) -> None:
        self.limit = limit
        self.cap = cap
        self.since: float | None = None
        self._tries = 0
        self._slow = 0.05

    @property
    def down(self) -> bool:
        """True while an outage is being waited out."""
        return self.since is not None

    def failed(self) -> bool:
        """Record a failure; False once the outage exceeds ``limit`` seconds."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        return now - self.since <= self.limit

    def delay(self) -> float:
        """Seconds to wait before the next attempt (and count the attempt)."""
        self._tries += 1
        if self._tries == 1:
            return 0.0
        if self.since is None or time.monotonic() - self.since < self.FAST_FOR:
            return random.uniform(0.01, 0.02)
        delay, self._slow = self._slow, min(self._slow * 2, self.cap)
        return min(delay, self.cap) * random.uniform(0.5, 1.0)

    async def pause(self) -> None:
        """Sleep before the next attempt (only yield, before the first)."""
        await asyncio.sleep(self.delay())

    def recovered(self) -> bool:
        """Record a success; True when it ended an outage."""
        was_down = self.since is not None
        self.since = None
        self._tries = 0
        self._slow = 0.05
        return was_down


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they are done. A cancellation that lands
    while an ``asyncio.timeout`` inside redis-py expires is absorbed (CPython
    3.11 turns it into that timeout), so cancel again until every task ends."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.05)


async def close_client(client: aioredis.Redis, timeout: float = 2.0) -> None:
    """Close a client's pool without hanging on a dead socket (redis-py #3941)."""
    try:
        async with asyncio.timeout(timeout):
            await client.aclose()
    except CONNECTION_ERRORS:
        pass


# -- Redis stream ids as event offsets -----------------------------------------
#
# A stream id is ``<ms>-<seq>``; the offset packs it into one int that keeps
# the order: ``ms * 2**20 + seq``. Today's ms need 41 bits, so offsets fit an
# int64 for a few thousand years. Auto-generated ids reach seq 2**20 only with
# over a million entries in one millisecond, which one Redis cannot write.

SEQ_BITS = 20
_SEQ_MASK = (1 << SEQ_BITS) - 1


def id_to_offset(entry_id: bytes | str) -> int:
    """The offset of a stream entry id such as ``b"1700000000000-3"``."""
    # int() parses ASCII bytes itself: no decode (one per published event).
    ms, _, seq = entry_id.partition(b"-" if isinstance(entry_id, bytes) else "-")  # type: ignore[arg-type]
    return (int(ms) << SEQ_BITS) | min(int(seq or 0), _SEQ_MASK)


def offset_to_id(offset: int) -> str:
    """The stream id an offset came from (inverse of :func:`id_to_offset`)."""
    return f"{offset >> SEQ_BITS}-{offset & _SEQ_MASK}"


def start_id(start: int | str) -> str:
    """The XGROUP CREATE id for ``start``: the new group's reads begin after it."""
    if start == "new":
        return "$"
    if start == "earliest" or start == 0:
        return "0"
    assert isinstance(start, int)
    return offset_to_id(start - 1)  # inclusive: start at the entry with this offset
