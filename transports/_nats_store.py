"""Publishing to the JetStream stream of ``nats+durable://``: wait for the
PubAck, retry with the same ``Nats-Msg-Id`` (deduplicated by the server) for up
to ``publish_timeout`` across reconnects, and refuse at once what the server's
``max_payload`` or the stream's ``max_msg_size`` would not take (a message over
``max_payload`` makes nats-server close the whole connection).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alkpubsub.errors import PayloadError, PublishError

from ._nats_common import too_big
from ._nats_connection import NatsConnection
from ._nats_decode import headers_size

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.api import PubAck

_CHUNK = 1000  # publish_many: futures in flight at once
MSG_ID_HEADER = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")
"""Bytes of the NATS header block we send, besides the id itself."""
EVENT_ID = 36
"""An event id (a UUID as text)."""


def message_size(data: bytes, msg_id: str, headers: dict[str, str] | None) -> int:
    """Bytes the server counts for a message: data plus the NATS header block."""
    size = len(data) + MSG_ID_HEADER + len(msg_id)
    return size + headers_size(headers) - 12 if headers else size


@dataclass(frozen=True, slots=True)
class WriterSettings:
    """What a :class:`StreamWriter` needs of the transport's options."""

    stream: str
    publish_timeout: float
    api_timeout: float
    duplicate_window: float


class StreamWriter:
    """Stores messages in one stream for one transport."""

    def __init__(
        self,
        conn: NatsConnection,
        settings: WriterSettings,
        *,
        js: Callable[[], JetStreamContext],
        check_open: Callable[[], None],
        recreate_stream: Callable[[], Awaitable[bool]],
    ) -> None:
        self._conn = conn
        self._settings = settings
        self._js = js
        self._check_open = check_open
        self._recreate_stream = recreate_stream
        self._attempts: set[asyncio.Timeout] = set()
        self._stream_max_msg: int | None = None
        self._max_message = 0  # bytes the server and the stream take in one message

    def fit(self, stream_max_msg: int | None) -> int:
        """Take the server's and the stream's limits (after connect and each
        reconnect); return the largest payload to accept."""
        self._stream_max_msg = stream_max_msg
        self._max_message = self._conn.message_limit(stream_max_msg)
        return self._conn.payload_limit(MSG_ID_HEADER + EVENT_ID, stream_max_msg)

    async def store(
        self, subject: str, data: bytes, msg_id: str, headers: dict[str, str] | None = None
    ) -> PubAck:
        """Publish to the stream and wait for its PubAck, retrying with the same
        ``Nats-Msg-Id`` for up to ``publish_timeout``. ``headers`` are more NATS
        headers (a binary CloudEvent's)."""
        size = message_size(data, msg_id, headers)
        if size > self._max_message:
            raise self._too_big(subject, size)
        hdrs = {"Nats-Msg-Id": msg_id, **headers} if headers else {"Nats-Msg-Id": msg_id}
        settings = self._settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.publish_timeout
        try:
            # The first attempt inlines attempt(): its generator-based context
            # manager and the module imports below cost ~10 us a publish.
            async with asyncio.timeout(
                min(settings.publish_timeout, settings.api_timeout)
            ) as scope:
                self._attempts.add(scope)
                try:
                    self._check_open()
                    return await self._js().publish(
                        subject, data, timeout=settings.publish_timeout + 1, headers=hdrs
                    )
                finally:
                    self._attempts.discard(scope)
        except Exception as exc:
            first: Exception | None = exc
        return await self._store_retrying(subject, data, hdrs, deadline, first)

    async def _store_retrying(
        self,
        subject: str,
        data: bytes,
        hdrs: dict[str, str],
        deadline: float,
        first: Exception | None,
    ) -> PubAck:
        """:meth:`store` after its first attempt failed with ``first``."""
        import nats.errors as nerr
        from nats.js.errors import APIError, NoStreamResponseError

        settings = self._settings
        loop = asyncio.get_running_loop()
        pause, silent = 0.05, 0
        while True:
            left = max(0.05, deadline - loop.time())
            try:
                if first is not None:
                    exc, first = first, None
                    raise exc
                self._check_open()
                async with self.attempt(min(left, settings.api_timeout)):
                    return await self._js().publish(subject, data, timeout=left + 1, headers=hdrs)
            except nerr.ConnectionClosedError:
                raise self._conn.lost_error() from None
            except nerr.OutboundBufferLimitError:
                error: Exception = PublishError("the outbound buffer is full while disconnected")
            except nerr.MaxPayloadError:
                raise self._too_big(subject, len(data) + headers_size(hdrs)) from None
            except TimeoutError as exc:
                error = exc  # no PubAck: server restarting, or a reconnect cut the wait
            except (NoStreamResponseError, nerr.NoRespondersError) as exc:
                # Just after a restart the stream may not listen yet; if it stays
                # silent it is gone (memory storage) and is made again.
                error, silent = exc, silent + 1
                if silent >= 3:
                    await self._recreate_stream()
            except APIError as exc:
                if exc.err_code == 10054:  # over the stream's max_msg_size (changed since)
                    raise self._too_big(subject, len(data) + headers_size(hdrs)) from None
                if exc.code != 503:
                    raise PublishError(
                        f"stream {settings.stream!r} refused the event on {subject!r}: {exc}"
                    ) from None
                error = exc
            if loop.time() + pause >= deadline:
                raise PublishError(
                    f"{self._conn.label}: no PubAck for the event on {subject!r} within "
                    f"{settings.publish_timeout:g} s ({error or 'timeout'}); it may or may "
                    "not be stored: publishing the same event again (transport.forward) "
                    f"is deduplicated within duplicate_window={settings.duplicate_window:g}s"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    def refusal(
        self, subject: str, data: bytes, msg_id: str, headers: dict[str, str] | None = None
    ) -> PayloadError | None:
        """The error :meth:`store` would raise at once for this message because
        the server or the stream can never take it, else None."""
        size = message_size(data, msg_id, headers)
        return self._too_big(subject, size) if size > self._max_message else None

    def _too_big(self, subject: str, size: int) -> PayloadError:
        limit = self._max_message
        if self._stream_max_msg == limit:
            return too_big(
                subject, size, limit, f"max_msg_size of stream {self._settings.stream!r}"
            )
        return too_big(subject, size, limit, "the NATS server's max_payload")

    async def store_many(
        self, items: list[tuple[str, bytes, str, dict[str, str] | None]]
    ) -> list[PubAck]:
        """Store ``(subject, data, msg_id, headers)`` items in order, many PubAcks
        in flight at once; return the PubAcks (``seq`` the stream sequence,
        ``duplicate`` set when the server already held that ``Nats-Msg-Id``
        within the stream's duplicate window: ``seq`` is then the original's).
        Every item is checked against the size limits before any is sent."""
        import nats.errors as nerr

        for subject, data, msg_id, headers in items:
            size = message_size(data, msg_id, headers)
            if size > self._max_message:
                raise self._too_big(subject, size)
        acks: list[PubAck] = []
        for start in range(0, len(items), _CHUNK):
            chunk = items[start : start + _CHUNK]
            futures: list[asyncio.Future[PubAck]] = []
            try:
                publish_async = self._js().publish_async
                for subject, data, msg_id, headers in chunk:
                    hdrs = (
                        {"Nats-Msg-Id": msg_id, **headers} if headers else {"Nats-Msg-Id": msg_id}
                    )
                    futures.append(await publish_async(subject, data, headers=hdrs))
            except nerr.ConnectionClosedError:
                raise self._conn.lost_error() from None
            except nerr.Error:
                pass  # the rest go through store() below
            if futures:
                with contextlib.suppress(TimeoutError):
                    async with self.attempt(self._settings.publish_timeout):
                        await asyncio.wait(futures)
            for i, (subject, data, msg_id, headers) in enumerate(chunk):
                fut = futures[i] if i < len(futures) else None
                if fut is not None and fut.done() and not fut.cancelled() and not fut.exception():
                    acks.append(fut.result())
                else:
                    if fut is not None:
                        fut.cancel()  # frees nats-py's in-flight slot
                    # Same id: a copy that did arrive is dropped by the server
                    # (and this PubAck says duplicate, though the copy was ours).
                    acks.append(await self.store(subject, data, msg_id, headers))
        return acks

    @contextlib.asynccontextmanager
    async def attempt(self, seconds: float) -> AsyncIterator[None]:
        """A time limit for waiting on JetStream answers that a reconnect cuts
        short (:meth:`cut_short`): answers to requests lost with the old
        connection never come, so retry at once."""
        async with asyncio.timeout(seconds) as scope:
            self._attempts.add(scope)
            try:
                yield
            finally:
                self._attempts.discard(scope)

    def cut_short(self) -> None:
        """End every wait of :meth:`attempt` now (the connection came back)."""
        now = asyncio.get_running_loop().time()
        for scope in self._attempts:
            scope.reschedule(now)
