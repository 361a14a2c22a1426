"""One Redis pub/sub connection, spoken in RESP2 straight off an asyncio
protocol: the ``redis://`` transport's subscriber side.

redis-py's ``PubSub`` is not safe for several tasks at once (a ``subscribe``
from one task reads, health-checks and may reconnect on the socket another
task is reading), and its reader wakes a task per 64 KB read, pausing and
resuming the socket every 128 KB. Here bytes land in one buffer sized for the
frame being read (``recv_into``; one copy when the frame is complete), every
complete frame is parsed and handed to ``on_frame`` synchronously in
``buffer_updated``, and commands go out with ``transport.write``, which never
waits, so the order of writes is the order of calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from redis import exceptions as rex

from ._redis_common import RedisTarget

log = logging.getLogger("alkpubsub.redis")

Frame = Any
"""A parsed RESP2 value: list, bytes, int, None, or ``redis.exceptions.ResponseError``."""

_MIN_READ = 65536
_KEEP = 1 << 20  # a buffer grown for a large frame shrinks back once drained


class ProtocolError(rex.ConnectionError):
    """The server sent something that is not RESP2: the connection is dropped."""


def pack(*args: bytes) -> bytes:
    """A command as RESP2 bytes."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


def parse(buf: bytearray, view: memoryview, pos: int, end: int) -> tuple[Frame, int] | int:
    """One frame from ``buf[pos:end]``: ``(frame, next position)``, or when
    incomplete the buffer length it needs at least (``end + 1`` when unknown)."""
    nl = buf.find(b"\r\n", pos, end)
    if nl < 0:
        return end + 1
    kind = buf[pos]
    if kind == 0x24:  # $ bulk string
        size = int(buf[pos + 1 : nl])
        if size < 0:
            return None, nl + 2
        start = nl + 2
        stop = start + size
        if stop + 2 > end:
            return stop + 2
        return view[start:stop].tobytes(), stop + 2
    if kind == 0x2A:  # * array
        items: list[Frame] = []
        at = nl + 2
        for _ in range(int(buf[pos + 1 : nl])):
            got = parse(buf, view, at, end)
            if isinstance(got, int):
                return got
            items.append(got[0])
            at = got[1]
        return items, at
    if kind == 0x3A:  # : integer
        return int(buf[pos + 1 : nl]), nl + 2
    if kind == 0x2B:  # + simple string
        return bytes(buf[pos + 1 : nl]), nl + 2
    if kind == 0x2D:  # - error
        return rex.ResponseError(buf[pos + 1 : nl].decode(errors="replace")), nl + 2
    raise ProtocolError(f"unexpected reply type {bytes([kind])!r}")


class PubSubWire(asyncio.BufferedProtocol):
    """A connected pub/sub socket; ``on_frame`` gets every frame read.
    ``lost`` resolves (with the error, if any) when the socket closes."""

    def __init__(self, on_frame: Callable[[Frame], None], label: str = "redis") -> None:
        self._on_frame = on_frame
        self.label = label
        """The server, for log lines (``RedisTarget.label``: no credentials)."""
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray(_MIN_READ)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._need = 0  # buffer length the frame being read needs
        self.frames = 0
        """Frames read so far (the health check watches it move)."""
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    # -- asyncio protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        # Room for the rest of the frame being read, so a large one arrives
        # in place and is copied once, when it is complete.
        want = max(_MIN_READ, self._need - self._end)
        if len(self._buf) - self._end < want:
            self._make_room(want)
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        buf, view, pos, end = self._buf, self._view, self._start, self._end
        need = 0
        while pos < end:
            try:
                got = parse(buf, view, pos, end)
            except (ProtocolError, ValueError) as exc:
                self._drop(ProtocolError(f"unreadable reply from {self.label} ({exc})"))
                return
            if isinstance(got, int):
                need = got
                break
            frame, pos = got
            self.frames += 1
            try:
                self._on_frame(frame)
            except Exception:
                # A bug in handling one frame must not cost the connection
                # (asyncio closes it when buffer_updated raises) nor the frames
                # already read behind it.
                log.exception("%s: handling a pub/sub frame failed; reading on", self.label)
        if pos == end:
            pos = self._end = need = 0
            if len(buf) > _KEEP:
                self._replace(bytearray(_MIN_READ), 0)
        self._start, self._need = pos, need

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.lost.done():
            self.lost.set_result(exc)

    # -- buffer --------------------------------------------------------------

    def _make_room(self, want: int) -> None:
        pending = self._end - self._start
        fresh = bytearray(max(len(self._buf), pending + want))
        fresh[:pending] = self._view[self._start : self._end]
        self._need = max(0, self._need - self._start)
        self._replace(fresh, pending)

    def _replace(self, buf: bytearray, end: int) -> None:
        self._view.release()
        self._buf, self._view = buf, memoryview(buf)
        self._start, self._end = 0, end

    # -- commands ----------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the socket is open."""
        return self._transport is not None and not self.lost.done()

    def send(self, data: bytes) -> None:
        """Write packed commands now (dropped silently once closed: ``lost`` says so)."""
        if self._transport is not None and data:
            self._transport.write(data)

    def _drop(self, error: BaseException) -> None:
        if not self.lost.done():
            self.lost.set_result(error)
        if self._transport is not None:
            self._transport.abort()

    def abort(self) -> None:
        """Drop the connection now (unsent writes are discarded)."""
        self._drop(rex.ConnectionError("connection dropped by the client"))


async def open_wire(
    target: RedisTarget, timeout: float, on_frame: Callable[[Frame], None]
) -> PubSubWire:
    """Connect (TLS when the target says so) and authenticate. Raises what
    redis-py would (``ConnectionError``, ``AuthenticationError``, OSError), so
    callers map errors with ``translate`` either way."""
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[Frame] = loop.create_future()

    def first(frame: Frame) -> None:
        if not reply.done():
            reply.set_result(frame)

    wire = PubSubWire(first, target.label)
    context = target.ssl_context()
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(
                lambda: wire,
                target.host,
                target.port,
                ssl=context,
                server_hostname=target.host if context else None,
            )
            if target.password is not None:
                user = (target.username.encode(),) if target.username else ()
                wire.send(pack(b"AUTH", *user, target.password.encode()))
                await asyncio.wait((reply, wire.lost), return_when=asyncio.FIRST_COMPLETED)
                if not reply.done():
                    raise rex.ConnectionError("the server closed the connection during AUTH")
                answer = reply.result()
                if isinstance(answer, rex.ResponseError):
                    raise rex.AuthenticationError(str(answer))
    except BaseException:
        wire.abort()
        raise
    wire._on_frame = on_frame
    return wire
