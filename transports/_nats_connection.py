"""One NATS connection with the lifecycle both NATS transports need: connect
with a deadline, fail fast on refused credentials, reconnect (nats-py replays
subscriptions), give up after ``reconnect_timeout``, and survive messages
nats-py itself cannot decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from alkpubsub.config import ParsedUrl, Settings
from alkpubsub.errors import ConfigError, ConnectionLost, PubSubError
from alkpubsub.limits import MAX_PAYLOAD_BYTES

from ._nats_common import NatsConnectionOptions, connect_kwargs, fitting_payload

if TYPE_CHECKING:
    from nats.aio.client import Client

log = logging.getLogger("alkpubsub.nats")

Hook = Callable[[], Awaitable[None] | None]


_ASCII = bytes(range(128)) + b"?" * 128


def _ascii(raw: bytes) -> bytes:
    # Same length: nats-py slices status lines by byte offsets.
    return raw.translate(_ASCII)


@functools.cache
def _client_class() -> type[Client]:
    from nats.aio.client import Client

    class TolerantClient(Client):
        """nats-py's client, except that a message whose subject or status line is
        not UTF-8 does not end the connection. nats-py (2.16) decodes them strictly
        inside its read loop, and the loop stops on the error without reconnecting:
        one raw ``PUB alk.x.\\xff`` matching a wildcard subscription silently ended
        all delivery on the connection (and every JetStream PubAck). Decoded with
        non-ASCII bytes as ``?`` instead, the message reaches us and is counted as
        malformed. The wrapper costs ~0.6 us a message (timeit), 1-3 % of ours."""

        async def _process_msg(
            self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
        ) -> None:
            try:
                await super()._process_msg(sid, subject, reply, data, headers)
            except UnicodeDecodeError:
                # Raised before the message was queued, so it is not delivered twice.
                clean = _ascii(headers) if headers else headers
                await super()._process_msg(sid, _ascii(subject), _ascii(reply), data, clean)

    return TolerantClient


class NatsConnection:
    """One nats-py client with the lifecycle both transports need.

    ``open`` connects within ``connect_timeout`` and fails fast on refused
    credentials. nats-py reconnects on its own and replays subscriptions;
    ``on_reconnect`` runs after each reconnect. If no connection comes back
    within ``reconnect_timeout``, the client is closed and ``on_lost`` receives a
    :class:`ConnectionLost` to fail the subscriptions with, so nothing hangs.
    """

    def __init__(
        self,
        url: ParsedUrl,
        options: NatsConnectionOptions,
        settings: Settings | None,
        *,
        label: str,
        on_lost: Callable[[ConnectionLost], None],
        on_reconnect: Hook | None = None,
        on_slow_consumer: Callable[[object], None] | None = None,
    ) -> None:
        self.url = url
        self.label = label
        self.options = options
        self._kwargs = connect_kwargs(url, options, settings)
        self._on_lost = on_lost
        self._on_reconnect = on_reconnect
        self._on_slow_consumer = on_slow_consumer
        self.client: Client | None = None
        self.reconnects = 0
        self._closing = False
        self._connected_once = False
        self._auth_failed: asyncio.Future[None] | None = None
        self._last_error: BaseException | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._logged: set[str] = set()

    @property
    def nc(self) -> Client:
        """The connected client (after ``open``)."""
        if self.client is None:
            raise ConnectionLost(f"{self.label} is not connected; await transport.connect()")
        return self.client

    async def open(self) -> None:
        """Connect, or raise :class:`ConnectionLost` / :class:`ConfigError` (credentials)."""
        if self.client is not None:
            return
        client = _client_class()()
        loop = asyncio.get_running_loop()
        self._auth_failed = loop.create_future()
        connecting = asyncio.ensure_future(
            client.connect(
                **self._kwargs,
                error_cb=self._error_cb,
                disconnected_cb=self._disconnected_cb,
                reconnected_cb=self._reconnected_cb,
                closed_cb=self._closed_cb,
            )
        )
        done, _ = await asyncio.wait(
            {connecting, self._auth_failed},
            timeout=self.options.connect_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if connecting in done and connecting.exception() is None:
            self._auth_failed.cancel()
            self.client = client
            self._connected_once = True
            return
        # Sticky: errors from tearing down the refused connection come after it.
        refused = self._auth_failed.done() and not self._auth_failed.cancelled()
        connecting.cancel()
        self._auth_failed.cancel()
        self._closing = True
        await asyncio.gather(connecting, return_exceptions=True)
        await client.close()
        error = self._last_error
        if error is None and connecting.done() and not connecting.cancelled():
            error = connecting.exception()
        if refused or self._is_auth_error(error):
            raise ConfigError(
                f"the NATS server at {self.url.redacted!r} refused the credentials "
                "(authorization violation); check the user/password or token in the URL "
                "or Settings"
            )
        reason = f": {error}" if error else ""
        raise ConnectionLost(
            f"cannot connect to NATS at {self.url.redacted!r} within "
            f"{self.options.connect_timeout:g} s{reason}; is nats-server running there? "
            "(raise connect_timeout= for slow networks)"
        )

    async def close(self) -> None:
        """Flush and close; idempotent."""
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.client is not None:
            await self._close_client(self.client)

    @staticmethod
    async def _close_client(client: Client) -> None:
        if client.is_closed:
            return
        if not client.is_connected:
            # Publishes buffered for the next connection cannot be sent now;
            # nats-py (2.16) would try to write them into the dead socket on
            # close and raise ConnectionResetError halfway through closing.
            client._pending = []
            client._pending_data_size = 0
        await client.close()

    def payload_limit(self, nats_headers: int, stream_limit: int | None = None) -> int:
        """The largest payload the server (and a stream's ``max_msg_size``, when
        given) can carry; logged once when below ``MAX_PAYLOAD_BYTES``."""
        limit = self.message_limit(stream_limit)
        fits = fitting_payload(limit, nats_headers)
        if fits < MAX_PAYLOAD_BYTES:
            self.log_once(
                f"max_payload:{limit}",
                "%s: the server takes messages of at most %d bytes; payloads are limited "
                "to %d bytes (the rest is for the envelope and headers)",
                self.label, limit, fits,
            )  # fmt: skip
        return fits

    def message_limit(self, stream_limit: int | None = None) -> int:
        """The largest message (payload plus NATS headers) the server takes now."""
        limit = self.nc.max_payload
        if stream_limit is not None and 0 < stream_limit < limit:
            limit = stream_limit
        return limit

    @property
    def connected(self) -> bool:
        """True while the client is connected."""
        return self.client is not None and self.client.is_connected

    def lost_error(self) -> ConnectionLost:
        """The error for using a closed or given-up connection."""
        return ConnectionLost(
            f"{self.label}: the connection to {self.url.redacted!r} is closed "
            f"(no server for {self.options.reconnect_timeout:g} s, or closed); "
            "connect a new transport"
        )

    @contextlib.contextmanager
    def translate(self, what: str) -> Iterator[None]:
        """Turn nats-py's errors and timeouts during ``what`` into :class:`ConnectionLost`."""
        from nats.errors import Error

        try:
            yield
        except PubSubError:
            raise
        except (Error, TimeoutError) as exc:
            raise ConnectionLost(
                f"{self.label}: {what} failed ({exc or type(exc).__name__}); the server did "
                "not answer in time: check that it is up, or retry"
            ) from None

    def log_once(self, kind: str, message: str, *args: object) -> None:
        """Log a warning the first time ``kind`` happens on this connection."""
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning(message, *args)

    @staticmethod
    def _is_auth_error(error: BaseException | None) -> bool:
        from nats.errors import AuthorizationError

        return isinstance(error, AuthorizationError) or (
            error is not None and "authorization" in str(error).lower()
        )

    # -- nats-py callbacks ----------------------------------------------------

    async def _error_cb(self, error: Exception) -> None:
        from nats.errors import SlowConsumerError

        if isinstance(error, SlowConsumerError):
            if self._on_slow_consumer is not None:
                self._on_slow_consumer(error.sub)
            self.log_once(
                f"slow:{error.sid}",
                "%s: slow consumer on %s, nats-py dropped messages (counted in stats.dropped)",
                self.label,
                error.subject,
            )
            return
        self._last_error = error
        if not self._connected_once:
            if self._is_auth_error(error) and self._auth_failed and not self._auth_failed.done():
                self._auth_failed.set_result(None)
            return
        # nats-py errors carry addresses, never our credentials (not in its URL).
        self.log_once(f"error:{type(error).__name__}", "%s: %s", self.label, error)

    async def _disconnected_cb(self) -> None:
        if self._closing or not self._connected_once:
            return
        log.warning(
            "%s: disconnected from %s; reconnecting for up to %g s",
            self.label,
            self.url.redacted,
            self.options.reconnect_timeout,
        )
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._give_up_later())

    async def _reconnected_cb(self) -> None:
        self.reconnects += 1
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        log.info("%s: reconnected to %s", self.label, self.url.redacted)
        if self._on_reconnect is not None:
            result = self._on_reconnect()
            if result is not None:
                await result

    async def _closed_cb(self) -> None:
        if not self._closing and self._connected_once:
            self._on_lost(self.lost_error())

    async def _give_up_later(self) -> None:
        await asyncio.sleep(self.options.reconnect_timeout)
        client = self.client
        if client is None or client.is_connected or self._closing:
            return
        log.error(
            "%s: no connection to %s for %g s; giving up",
            self.label,
            self.url.redacted,
            self.options.reconnect_timeout,
        )
        self._closing = True
        self._on_lost(self.lost_error())
        await self._close_client(client)
