"""Spoke transport: publish and subscribe through a hub over one WebSocket.

Features
    As the hub's transport for this tenant (its ``welcome`` says), plus
    cross_process and cross_node: normally the hub's ``honker+durable`` store
    (persistent, replay, consumer offsets, dead letters, wildcards, ordered).
    Publishes are acknowledged once the hub's transport accepted them (for a
    store: committed). A subscription gets events within the credit it gives
    the hub (its buffer), so a slow spoke never makes the hub buffer without
    bound. After a dropped connection the transport reconnects with backoff
    (0.1 s doubling to ``reconnect_max``) and subscribes again: a durable
    subscription resumes after its last saved ack (events delivered but not
    acked come again), a live one misses what was published meanwhile
    (``stats.reconnects``, ``stats.offline_ms``). A publish unanswered when the
    connection dropped raises ``ConnectionLost``; while disconnected, publishes
    raise ``ConnectionLost`` at once. Protocol: ``docs/hub-protocol.md``.

Connection String
    ``ws://host:port/path`` or ``wss://host:port/path`` (TLS; ``tls_ca`` from
    Settings for a private CA). The token: ``?token=...`` or ``Settings.token``;
    it is sent as ``Authorization: Bearer`` and never logged.

Transport Options
    ``token``            the hub token (secret)
    ``connect_timeout``  seconds to open the WebSocket and get ``welcome`` (10)
    ``request_timeout``  seconds to wait for the hub's answer to a publish or
                         subscribe (30)
    ``reconnect_max``    the longest wait between reconnect attempts (5)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from pydantic import Field

from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.config import ParsedUrl, Settings, TransportOptions, parse_options, parse_url
from alkpubsub.errors import (
    ConfigError,
    ConnectionLost,
    ConsumerBusy,
    PayloadError,
    PublishError,
    PubSubError,
    Unauthorized,
)
from alkpubsub.event import Event
from alkpubsub.hub import protocol as p
from alkpubsub.hub.logs import CLIENT_LOGGERS, protect
from alkpubsub.subscription import Subscription
from alkpubsub.transport import BaseTransport

log = logging.getLogger("alkpubsub.ws")
_LOG = logging.getLogger("alkpubsub.ws.websockets")
"""The websockets client's logger, with hub tokens masked (it logs request
headers at debug level)."""
protect(("alkpubsub.ws.websockets", *CLIENT_LOGGERS))

_CAPABILITY_NAMES = frozenset(f.name for f in fields(Capabilities))
CLOSE_FLUSH_TIMEOUT = 5.0
"""Seconds close() waits for queued frames (acks) to reach the hub."""
_REPORTED = ("dropped", "malformed", "dead_lettered", "redelivered")
"""Counters the hub's subscription passes on in ``event`` frames."""


class WsOptions(TransportOptions):
    """Options of ``ws://``/``wss://`` URLs (see the module docstring)."""

    token: str | None = Field(None, repr=False)
    connect_timeout: float = Field(10.0, gt=0)
    request_timeout: float = Field(30.0, gt=0)
    reconnect_max: float = Field(5.0, gt=0)


def _error(header: dict[str, Any], what: str) -> PubSubError:
    code, message = header.get("code"), header.get("message", "")
    text = f"the hub refused {what}: {message}"
    if code == p.NOT_ALLOWED:
        return Unauthorized(text)
    if code == p.BUSY:
        return ConsumerBusy(text)
    if code in (p.INVALID, p.BAD_FRAME):
        return ConfigError(text) if what.startswith("subscrib") else PayloadError(text)
    return PublishError(text)


class WsTransport(BaseTransport):
    """A spoke of a hub (see the module docstring)."""

    capabilities = Capabilities()

    def __init__(
        self,
        url: str,
        name: str,
        options: WsOptions,
        *,
        ssl_context: ssl.SSLContext | None,
        origin: str | None,
    ) -> None:
        super().__init__(origin=origin)
        self.name = name
        self.options = options
        self.max_deliveries = 0
        self.tenant: str | None = None
        self._url = url
        self._ssl = ssl_context
        self._ws: Any = None
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._next_sub = 0
        self._subs: dict[str, WsSubscription] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._reconnecting: asyncio.Task[None] | None = None
        self._down_since: float | None = None
        self._refused: PubSubError | None = None

    # -- connection ---------------------------------------------------------

    async def connect(self) -> None:
        await self._open()

    async def _open(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

        headers = {"Authorization": f"Bearer {self.options.token}"} if self.options.token else {}
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                ws = await connect(
                    self._url,
                    logger=_LOG,
                    subprotocols=[p.SUBPROTOCOL],  # type: ignore[list-item]
                    additional_headers=headers,
                    max_size=p.MAX_FRAME_BYTES,
                    ssl=self._ssl,
                    open_timeout=None,
                    compression=None,
                )
                try:
                    header, _ = p.decode(await ws.recv(), p.HUB_OPS)
                except BaseException:
                    await ws.close()
                    raise
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise Unauthorized(
                    f"{self.name}: the hub refused the connection (HTTP {status}): the token is "
                    "not accepted, or no hub is mounted at this path (a Starlette Mount needs "
                    "the trailing '/')"
                ) from None
            raise ConnectionLost(f"{self.name}: the hub answered HTTP {status}") from None
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
            raise ConnectionLost(
                f"{self.name}: cannot reach the hub ({type(exc).__name__})"
            ) from None
        except p.FrameError as exc:
            raise ConnectionLost(
                f"{self.name}: the hub's first frame was not readable: {exc}"
            ) from None
        if header.get("op") != "welcome":
            await ws.close()
            raise ConnectionLost(
                f"{self.name}: the hub's first frame was {header.get('op')!r}, not welcome"
            )
        self._welcome(header)
        self._ws = ws
        self._outbox = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._reader(ws)),
            asyncio.create_task(self._writer(ws)),
        ]

    def _welcome(self, header: dict[str, Any]) -> None:
        names = {n for n in header.get("capabilities", []) if n in _CAPABILITY_NAMES}
        names |= {"cross_process", "cross_node"}
        names.discard("transactional_publish")
        self.capabilities = Capabilities(**{n: True for n in names})
        self.max_deliveries = int(header.get("max_deliveries") or 0)
        self.tenant = header.get("tenant")
        limit = header.get("max_payload")
        if type(limit) is int and 0 < limit < self.max_payload_bytes:
            self.max_payload_bytes = limit

    @property
    def connected(self) -> bool:
        return self._ws is not None

    async def _writer(self, ws: Any) -> None:
        outbox = self._outbox
        with contextlib.suppress(Exception):
            while True:
                frame = await outbox.get()
                if frame is None:
                    return  # closing: everything queued before it was sent
                await ws.send(frame)

    async def _reader(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        code = None
        try:
            async for message in ws:
                try:
                    header, lines = p.decode(message, p.HUB_OPS)
                except p.FrameError as exc:
                    log.warning("%s: unreadable frame from the hub: %s", self.name, exc)
                    continue
                self._dispatch(header, lines)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
        except Exception:
            log.exception("%s: the connection's reader failed", self.name)
        finally:
            self._lost(ws, code)

    def _dispatch(self, header: dict[str, Any], lines: list[bytes]) -> None:
        op = header["op"]
        if op == "event":
            sub = self._subs.get(header["sub"])
            if sub is None or not lines:
                return
            offset = header.get("offset")
            try:
                event = p.read_event(lines[0], offset=offset if type(offset) is int else None)
            except PayloadError as exc:
                self.report_malformed(sub, "envelope", str(exc))
                sub.took(1)
                return
            stats = sub.stats
            for name in _REPORTED:
                count = header.get(name)
                if type(count) is int and count > 0:
                    setattr(stats, name, getattr(stats, name) + count)
            sub.deliver(event)
            return
        request = header.get("id")
        if (
            op in ("published", "subscribed", "unsubscribed", "pong", "error")
            and type(request) is int
        ):
            future = self._requests.pop(request, None)
            if future is not None and not future.done():
                future.set_result(header)
            return
        if op == "ended":
            sub = self._subs.get(header["sub"])
            if sub is not None:
                sub.fail(ConnectionLost(f"the hub ended {sub.pattern.text!r}: {header['message']}"))
            return
        if op == "error":
            log.warning("%s: the hub reported %s: %s", self.name, header["code"], header["message"])

    def _lost(self, ws: Any, code: int | None) -> None:
        if self._ws is not ws:
            return
        self._ws = None
        for task in self._tasks:
            task.cancel()
        error = ConnectionLost(f"{self.name}: the connection to the hub dropped")
        requests, self._requests = self._requests, {}
        for future in requests.values():
            if not future.done():
                future.set_exception(error)
        if self.closed:
            return
        for sub in self._subs.values():
            sub.connection_lost()
        if code == p.CLOSE_UNAUTHORIZED:
            self._refused = Unauthorized(f"{self.name}: the hub no longer accepts this token")
            for sub in list(self._subs.values()):
                sub.fail(self._refused)
            return
        self._down_since = time.monotonic()
        self._reconnecting = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.1
        while not self.closed:
            await asyncio.sleep(delay)
            try:
                await self._open()
                break
            except Unauthorized as exc:
                self._refused = exc
                for sub in list(self._subs.values()):
                    sub.fail(exc)
                return
            except PubSubError:
                delay = min(delay * 2, self.options.reconnect_max)
        else:
            return
        down = self._down_since
        offline = int((time.monotonic() - down) * 1000) if down is not None else 0
        self._down_since = None
        for sub in list(self._subs.values()):
            sub.stats.reconnects += 1
            sub.stats.offline_ms += offline
            try:
                await sub.resubscribe()
            except PubSubError as exc:
                sub.fail(exc)

    # -- frames ---------------------------------------------------------------

    def post(self, frame: bytes) -> None:
        """Queue a frame that needs no answer (credit, ack, nack); dropped with
        the connection if it is down."""
        if self._ws is not None:
            self._outbox.put_nowait(frame)

    def _request_future(self) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        if self._ws is None:
            if self._refused is not None:
                raise self._refused
            raise ConnectionLost(f"{self.name}: not connected to the hub (reconnecting)")
        self._next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[self._next_id] = future
        return self._next_id, future

    async def _answer(self, request: int, future: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.options.request_timeout):
                return await future
        except TimeoutError:
            self._requests.pop(request, None)
            raise ConnectionLost(
                f"{self.name}: the hub did not answer within {self.options.request_timeout} s"
            ) from None

    async def request(
        self, header: dict[str, Any], envelopes: Sequence[bytes] = ()
    ) -> dict[str, Any]:
        """Send a frame and wait for the hub's answer to it."""
        request, future = self._request_future()
        header["id"] = request
        self._outbox.put_nowait(p.encode(header, envelopes))
        return await self._answer(request, future)

    # -- publishing -------------------------------------------------------------

    async def send(self, event: Event, body: bytes) -> Event:
        [sent] = await self.send_batch([(event, body)])
        return sent

    async def send_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        self.check_open()
        frames: list[tuple[list[Event], int, asyncio.Future[dict[str, Any]]]] = []
        chunk: list[Event] = []
        lines: list[bytes] = []
        size = 0
        budget = p.MAX_FRAME_BYTES - p.MAX_HEADER_BYTES

        def flush() -> None:
            request, future = self._request_future()
            self._outbox.put_nowait(p.encode({"op": "publish", "id": request}, lines))
            frames.append((list(chunk), request, future))
            chunk.clear()
            lines.clear()

        for event, body in batch:
            line = event.envelope(body)
            if chunk and (len(chunk) >= p.MAX_BATCH or size + len(line) + 1 > budget):
                flush()
                size = 0
            chunk.append(event)
            lines.append(line)
            size += len(line) + 1
        if chunk:
            flush()
        out: list[Event] = []
        for events, request, future in frames:
            answer = await self._answer(request, future)
            if answer["op"] == "error":
                raise _error(answer, f"a publish of {len(events)} event(s)")
            offsets = answer.get("offsets") or []
            for i, event in enumerate(events):
                offset = offsets[i] if i < len(offsets) else None
                out.append(event.with_offset(offset) if type(offset) is int else event)
        return out

    # -- subscribing -------------------------------------------------------------

    def make_subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        return WsSubscription(self, pattern, consumer=consumer, start=start, buffer=buffer)

    def new_sub_id(self) -> str:
        self._next_sub += 1
        return f"s{self._next_sub}"

    async def disconnect(self) -> None:
        reconnecting = self._reconnecting
        if reconnecting is not None:
            reconnecting.cancel()
            with contextlib.suppress(BaseException):
                await reconnecting
        ws, self._ws = self._ws, None
        if ws is not None and len(self._tasks) == 2 and not self._tasks[1].done():
            # Send what is queued first (acks, nacks, unsubscribes posted just
            # before close), so the hub saves the acks.
            self._outbox.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._tasks[1]), CLOSE_FLUSH_TIMEOUT)
        for task in self._tasks:
            task.cancel()
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        for future in self._requests.values():
            if not future.done():
                future.set_exception(ConnectionLost(f"{self.name}: closed"))
        self._requests = {}


class WsSubscription(Subscription):
    """A subscription through the hub; its buffer is the credit it gives."""

    transport: WsTransport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sid = ""
        self._taken = 0

    async def on_start(self) -> None:
        transport = self.transport
        self.sid = transport.new_sub_id()
        transport._subs[self.sid] = self
        try:
            await self._subscribe(self.buffer_size)
        except BaseException:
            transport._subs.pop(self.sid, None)
            raise

    async def _subscribe(self, credit: int) -> None:
        start: Any = self.start_at
        answer = await self.transport.request(
            {
                "op": "subscribe",
                "sub": self.sid,
                "pattern": self.pattern.text,
                "consumer": self.consumer,
                "start": start,
                "credit": credit,
            }
        )
        if answer["op"] == "error":
            raise _error(answer, f"subscribing to {self.pattern.text!r}")

    def connection_lost(self) -> None:
        """The connection dropped: a durable subscription's buffered events
        will come again from the hub after the reconnect, and acks for them
        could not reach it now, so they are not handed out meanwhile."""
        if self.consumer is not None:
            self._buffer.clear()

    async def resubscribe(self) -> None:
        """After a reconnect: a durable subscription's buffered events come again
        from the hub, so they are dropped here; a live one keeps them."""
        if self.consumer is not None:
            self._buffer.clear()
        self._taken = 0
        await self._subscribe(self.buffer_size)

    async def on_close(self) -> None:
        transport = self.transport
        transport._subs.pop(self.sid, None)
        transport.post(p.encode({"op": "unsubscribe", "sub": self.sid}))

    @property
    def _credit_on_arrival(self) -> bool:
        # A live subscription's buffer drops its oldest event when full (counted
        # here, as on every transport), so an event that reached it gives its
        # credit back at once: credit bounds only what is in flight on the wire,
        # and the hub drops (and counts) only for a spoke that stops reading its
        # socket. A durable one gives credit back as the application takes
        # events, so the hub's reader pauses and nothing is lost.
        return self._sink is not None or self.consumer is None

    def deliver(self, event: Event) -> None:
        self.push(event)
        if self._credit_on_arrival:
            self.took(1)

    def took(self, n: int) -> None:
        """``n`` events left the buffer: give the credit back, in batches."""
        self._taken += n
        if self._taken >= max(1, self.buffer_size // 4):
            taken, self._taken = self._taken, 0
            self.transport.post(p.encode({"op": "credit", "sub": self.sid, "n": taken}))

    async def __anext__(self) -> Event:
        event = await super().__anext__()
        if not self._credit_on_arrival:
            self.took(1)
        return event

    async def ack(self, event: Event) -> None:
        await super().ack(event)
        if self.consumer is not None:
            self.transport.post(p.encode({"op": "ack", "sub": self.sid, "event": event.id}))

    async def nack(self, event: Event, *, delay: float = 0, reason: str | None = None) -> None:
        await super().nack(event, delay=delay, reason=reason)
        if self.consumer is not None:
            frame: dict[str, Any] = {
                "op": "nack",
                "sub": self.sid,
                "event": event.id,
                "delay": delay,
            }
            if reason is not None:
                frame["reason"] = reason
            self.transport.post(p.encode(frame))


def _ssl_context(parsed: ParsedUrl, settings: Settings | None) -> ssl.SSLContext | None:
    if parsed.scheme != "wss":
        return None
    context = ssl.create_default_context()
    if settings is not None and settings.tls_ca is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca))
    if settings is not None and settings.tls_cert is not None:
        context.load_cert_chain(
            str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None
        )
    return context


def from_url(url: str, settings: Settings | None = None) -> WsTransport:
    """Build a spoke transport from ``ws://`` or ``wss://``."""
    parsed = parse_url(url)
    options = parse_options(WsOptions, parsed, settings)
    if options.token is None and settings is not None and settings.token is not None:
        options = options.model_copy(update={"token": settings.token.get_secret_value()})
    if not parsed.host:
        raise ConfigError(f"{parsed.redacted!r} names no hub host: write ws://host:port/path")
    port = f":{parsed.port}" if parsed.port else ""
    target = f"{parsed.scheme}://{parsed.host}{port}{parsed.path or '/'}"
    return WsTransport(
        target,
        parsed.redacted,
        options,
        ssl_context=_ssl_context(parsed, settings),
        origin=settings.origin if settings else None,
    )
