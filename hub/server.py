"""The hub: any transport, per tenant, served over WebSocket as an ASGI app.

``Hub(backend, auth=...)`` is an ASGI application: mount it in Starlette or
FastAPI (``app.mount("/events", hub)``), or run it with ``alkpubsub hub``
(uvicorn). ``backend`` is a URL with ``{tenant}`` in it
(``honker+durable:///data?tenant={tenant}``, ``memory://hub-{tenant}``), or an
async callable ``tenant -> Transport``; each tenant gets its own transport, so
one tenant's spokes never see another's events. The frame protocol is
``docs/hub-protocol.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import alkpubsub
from alkpubsub.config import redact_url
from alkpubsub.errors import ConfigError, ConnectionLost, ConsumerBusy, PubSubError
from alkpubsub.event import Event, encode_payload
from alkpubsub.limits import MAX_PAYLOAD_BYTES
from alkpubsub.storage.stores import check_org_id
from alkpubsub.topics import validate_topic
from alkpubsub.transport import DEFAULT_BUFFER, Subscription, Transport

from . import protocol as p
from .auth import Authenticator, Grant
from .logs import SERVER_LOGGERS, protect

log = logging.getLogger("alkpubsub.hub")

Backend = str | Callable[[str], Awaitable[Transport]]
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]

CLOSE_STEP_TIMEOUT = 5.0
"""Seconds a transport's or subscription's close may take when the hub closes."""
SUBSCRIBE_TIMEOUT = 30.0
"""Seconds the hub's transport may take to start a subscription."""
DEFAULT_MAX_SUBSCRIPTIONS = 1000
DEFAULT_SEND_QUEUE = 1024
DEFAULT_SLOW_TIMEOUT = 10.0
DEFAULT_MAX_UNACKED = 10_000
DEFAULT_PUBLISHES_IN_FLIGHT = 64
MAX_SUB_BUFFER = 65_536
"""The largest buffer the hub gives one subscription of its transport."""
CLOSE_TIMEOUT = 10.0
"""Seconds the hub waits to send a close frame (4408, 4503) to a spoke."""


class Hub:
    """Serve ``backend``'s transports over WebSocket (see the module docstring).

    ``auth`` maps a token to a :class:`Grant` (see :func:`alkpubsub.hub.tokens`).
    ``send_queue`` frames wait per connection; one that stays full for
    ``slow_timeout`` seconds is closed (4408). ``max_unacked`` delivered but
    unacked events per durable subscription pause its delivery;
    ``max_subscriptions`` per connection (1,000) bound what one spoke holds."""

    def __init__(
        self,
        backend: Backend,
        *,
        auth: Authenticator,
        send_queue: int = DEFAULT_SEND_QUEUE,
        slow_timeout: float = DEFAULT_SLOW_TIMEOUT,
        max_unacked: int = DEFAULT_MAX_UNACKED,
        max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
    ) -> None:
        if isinstance(backend, str) and "{tenant}" not in backend:
            raise ConfigError(
                f"hub backend {redact_url(backend)!r} has no {{tenant}}: "
                "give each tenant its own transport (e.g. honker+durable:///data?tenant={tenant})"
            )
        self._backend = backend
        self.auth = auth
        protect(SERVER_LOGGERS)
        self.send_queue = send_queue
        self.slow_timeout = slow_timeout
        self.max_unacked = max_unacked
        self.max_subscriptions = max_subscriptions
        self._transports: dict[str, Transport] = {}
        self._opening: dict[str, asyncio.Future[Transport]] = {}
        self._connections: set[HubConnection] = set()
        self._closed = False

    async def transport_for(self, tenant: str) -> Transport:
        """The tenant's transport, opened once and shared by its connections."""
        check_org_id(tenant)
        transport = self._transports.get(tenant)
        if transport is not None:
            return transport
        pending = self._opening.get(tenant)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Transport] = asyncio.get_running_loop().create_future()
        self._opening[tenant] = future
        try:
            if isinstance(self._backend, str):
                transport = await alkpubsub.connect(self._backend.replace("{tenant}", tenant))
            else:
                transport = await self._backend(tenant)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters re-raise it
            raise
        finally:
            del self._opening[tenant]
        if self._closed:  # close() ran while it opened: it would stay open
            with contextlib.suppress(Exception):
                await transport.close()
            error = ConnectionLost("the hub is shutting down")
            future.set_exception(error)
            future.exception()
            raise error
        self._transports[tenant] = transport
        future.set_result(transport)
        return transport

    @property
    def connections(self) -> int:
        """Spokes connected now."""
        return len(self._connections)

    async def close(self) -> None:
        """Close every connection (4503: the spokes reconnect later) and transport."""
        self._closed = True
        await asyncio.gather(
            *(c.shutdown(p.CLOSE_HUB_CLOSING, "hub closing") for c in list(self._connections)),
            return_exceptions=True,
        )
        # Let each connection close its subscriptions (durable ones save their
        # position) before the transports under them close.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while self._connections:  # noqa: ASYNC110 - polls the set of connections
                    await asyncio.sleep(0.01)
        transports, self._transports = list(self._transports.values()), {}
        for transport in transports:
            # A transport that hangs in close (a broker gone silent) must not
            # keep the hub from closing.
            with contextlib.suppress(Exception, TimeoutError):
                async with asyncio.timeout(CLOSE_STEP_TIMEOUT):
                    await transport.close()

    # -- ASGI ------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        else:
            body = b"alkpubsub hub: connect with a WebSocket (subprotocol alkpubsub.v1)\n"
            await send(
                {
                    "type": "http.response.start",
                    "status": 426,
                    "headers": [(b"content-type", b"text/plain"), (b"upgrade", b"websocket")],
                }
            )
            await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: ASGIReceive, send: ASGISend) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _websocket(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if self._closed:
            await _unavailable(scope, send, p.CLOSE_HUB_CLOSING, "the hub is shutting down")
            return
        if p.SUBPROTOCOL not in scope.get("subprotocols", []):
            await send({"type": "websocket.close", "code": p.CLOSE_PROTOCOL})
            return
        try:
            grant = await self.auth(_token(scope))
        except Exception:
            log.exception("hub: the authenticator failed; refusing the connection")
            await _unavailable(scope, send, 1011, "the hub's authenticator failed")
            return
        if grant is None:
            await send({"type": "websocket.close", "code": p.CLOSE_UNAUTHORIZED})
            return
        try:
            transport = await self.transport_for(grant.tenant)
        except Exception as exc:
            log.error("hub: tenant %r's transport did not open: %s", grant.tenant, exc)
            await _unavailable(scope, send, 1011, "the tenant's transport is unavailable")
            return
        if self._closed:  # close() ran while this connection authenticated
            await _unavailable(scope, send, p.CLOSE_HUB_CLOSING, "the hub is shutting down")
            return
        await send({"type": "websocket.accept", "subprotocol": p.SUBPROTOCOL})
        connection = HubConnection(self, grant, transport, send)
        self._connections.add(connection)
        try:
            await connection.run(receive)
        finally:
            self._connections.discard(connection)


async def _unavailable(scope: dict[str, Any], send: ASGISend, code: int, text: str) -> None:
    """Refuse an upgrade for a reason that passes (the hub closing, its
    transport down): HTTP 503 where the server can send a response (a close
    before ``accept`` is HTTP 403, which a spoke takes for a refused token and
    stops reconnecting), else a close with ``code``."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": code})
        return
    body = f"alkpubsub hub: {text}; try again later\n".encode()
    await send(
        {
            "type": "websocket.http.response.start",
            "status": 503,
            "headers": [(b"content-type", b"text/plain"), (b"retry-after", b"1")],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})


def _token(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            if kind.lower() == "bearer" and token:
                return str(token).strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("token")
    return values[-1] if values else None


REPORTED = ("dropped", "malformed", "dead_lettered", "redelivered")
"""Counters of the hub's subscription that ``event`` frames pass on to the
spoke's (``dropped`` always, the others when not zero)."""


class _HubSub:
    """One spoke subscription: the hub transport's subscription and its pump."""

    def __init__(self, sid: str, sub: Subscription, credit: int) -> None:
        self.sid = sid
        self.sub = sub
        self.credit = credit
        self.has_credit = asyncio.Event()
        if credit > 0:
            self.has_credit.set()
        self.unacked: dict[str, Event] = {}
        self.room = asyncio.Event()
        self.room.set()
        self.reported: dict[str, int] = dict.fromkeys(REPORTED, 0)
        self.task: asyncio.Task[None] | None = None


class HubConnection:
    """One connected spoke."""

    def __init__(self, hub: Hub, grant: Grant, transport: Transport, send: ASGISend) -> None:
        self.hub = hub
        self.grant = grant
        self.transport = transport
        self._send = send
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue(hub.send_queue)
        self._subs: dict[str, _HubSub] = {}
        self._publishing = asyncio.Semaphore(DEFAULT_PUBLISHES_IN_FLIGHT)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._done = asyncio.Event()
        self._close_code = 1000
        self._pending: set[str] = set()
        self._close_reason = ""

    # -- sending ---------------------------------------------------------------

    async def enqueue(self, frame: bytes) -> None:
        """Queue a frame; a queue full for ``slow_timeout`` closes the connection."""
        if self._done.is_set():
            return  # closing: nothing more goes out
        try:
            self._out.put_nowait(frame)
            return
        except asyncio.QueueFull:
            pass
        try:
            async with asyncio.timeout(self.hub.slow_timeout):
                await self._out.put(frame)
        except TimeoutError:
            log.warning(
                "hub: a %s spoke stayed %s s behind; disconnecting it",
                self.grant.tenant,
                self.hub.slow_timeout,
            )
            await self.shutdown(p.CLOSE_TOO_SLOW, "too slow")

    async def _writer(self) -> None:
        send, out = self._send, self._out
        while True:
            frame = await out.get()
            if frame is None:
                return
            await send({"type": "websocket.send", "bytes": frame})

    async def shutdown(self, code: int, reason: str) -> None:
        """Close the connection with ``code``: :meth:`run` ends the connection's
        subscriptions (durable ones save their position), then sends the close."""
        if self._done.is_set():
            return
        self._close_code, self._close_reason = code, reason
        self._done.set()

    async def _send_close(self) -> None:
        # After the writer stopped, so the close follows the frames already sent.
        # The server sends it once its write buffer has room: a spoke that was
        # too slow (4408) and reads again gets it after what was queued for it.
        # Bounded: a spoke that never reads again is dropped without it.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._send(
                    {
                        "type": "websocket.close",
                        "code": self._close_code,
                        "reason": self._close_reason,
                    }
                )

    # -- the connection's life -------------------------------------------------

    async def run(self, receive: ASGIReceive) -> None:
        writer = asyncio.create_task(self._writer())
        reader = asyncio.create_task(self._read(receive))
        done = asyncio.create_task(self._done.wait())
        try:
            await self.enqueue(
                p.encode(
                    {
                        "op": "welcome",
                        "v": p.VERSION,
                        "tenant": self.grant.tenant,
                        "capabilities": self.transport.capabilities.names(),
                        "max_deliveries": getattr(self.transport, "max_deliveries", 0),
                        "max_payload": getattr(self.transport, "max_payload_bytes", 0),
                        "max_frame": p.MAX_FRAME_BYTES,
                    }
                )
            )
            await asyncio.wait({writer, reader, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, done, *self._tasks):
                task.cancel()
            subs, self._subs = list(self._subs.values()), {}
            for hub_sub in subs:
                await self._end(hub_sub)
            if not writer.done():
                with contextlib.suppress(asyncio.QueueFull):
                    self._out.put_nowait(None)
                writer.cancel()
            await asyncio.gather(writer, reader, *self._tasks, return_exceptions=True)
            if self._done.is_set():
                await self._send_close()

    async def _read(self, receive: ASGIReceive) -> None:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                return
            if kind != "websocket.receive":
                continue
            data = message.get("bytes")
            if data is None:
                data = (message.get("text") or "").encode()
            try:
                header, lines = p.decode(data, p.CLIENT_OPS)
            except p.FrameError as exc:
                await self.enqueue(p.error_frame(exc.code, str(exc), request=exc.request))
                continue
            await self._dispatch(header, lines)

    async def _dispatch(self, header: dict[str, Any], lines: list[bytes]) -> None:
        op = header["op"]
        if op == "publish":
            await self._publishing.acquire()
            task = asyncio.create_task(self._publish(header["id"], lines))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif op == "subscribe":
            # As a task: a backend slow to start a subscription must not stop
            # this connection's pings, acks and credit.
            task = asyncio.create_task(self._subscribe(header))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif op == "credit":
            hub_sub = self._subs.get(header["sub"])
            if hub_sub is not None:
                hub_sub.credit += header["n"]
                if hub_sub.credit > 0:
                    hub_sub.has_credit.set()
        elif op in ("ack", "nack"):
            await self._settle(op, header)
        elif op == "unsubscribe":
            hub_sub = self._subs.pop(header["sub"], None)
            if hub_sub is not None:
                await self._end(hub_sub)
            await self.enqueue(p.encode({"op": "unsubscribed", "sub": header["sub"]}))
        elif op == "ping":
            pong: dict[str, Any] = {"op": "pong"}
            if "id" in header:
                pong["id"] = header["id"]
            await self.enqueue(p.encode(pong))

    # -- publish ---------------------------------------------------------------

    async def _publish(self, request: int, lines: list[bytes]) -> None:
        # The slot is held until the answer is queued: a spoke that publishes
        # but does not read its answers stops being read (64 frames at most).
        try:
            await self.enqueue(await self._publish_frame(request, lines))
        finally:
            self._publishing.release()

    async def _publish_frame(self, request: int, lines: list[bytes]) -> bytes:
        if not lines:
            return p.error_frame(p.BAD_FRAME, "publish frame without events", request=request)
        events = []
        limit = getattr(self.transport, "max_payload_bytes", MAX_PAYLOAD_BYTES)
        for index, line in enumerate(lines):
            try:
                event = p.read_event(line)
            except PubSubError as exc:
                return p.error_frame(p.INVALID, f"event {index}: {exc}", request=request)
            if not self.grant.may_publish(event.topic):
                return p.error_frame(
                    p.NOT_ALLOWED,
                    f"event {index}: this token may not publish to {event.topic!r}",
                    request=request,
                )
            try:
                # Everything the transport would refuse, checked before any of
                # the frame is sent: an error answer means nothing was published.
                validate_topic(event.topic)
                if len(line) > limit:  # the payload is shorter than its envelope
                    encode_payload(event.payload, topic=event.topic, max_bytes=limit)
            except PubSubError as exc:
                return p.error_frame(p.INVALID, f"event {index}: {exc}", request=request)
            events.append(event)
        try:
            # read_event held each payload to the publish limits already and the
            # sizes were checked above: the payloads are not walked again.
            results = await self.transport.forward_many(  # type: ignore[attr-defined]
                events, decoded=True
            )
        except PubSubError as exc:
            return p.error_frame(p.UNAVAILABLE, str(exc), request=request)
        for index, result in enumerate(results):
            if result.refused is not None:
                return p.error_frame(p.INVALID, f"event {index}: {result.refused}", request=request)
        return p.encode(
            {"op": "published", "id": request, "offsets": [r.event.offset for r in results]}
        )

    # -- subscribe -------------------------------------------------------------

    async def _subscribe(self, header: dict[str, Any]) -> None:
        request, sid, pattern = header["id"], header["sub"], header["pattern"]
        if sid in self._subs:
            await self.enqueue(
                p.error_frame(p.BAD_FRAME, f"subscription {sid!r} exists", request=request)
            )
            return
        if not self.grant.may_subscribe(pattern):
            await self.enqueue(
                p.error_frame(
                    p.NOT_ALLOWED, f"this token may not subscribe to {pattern!r}", request=request
                )
            )
            return
        if sid in self._pending:
            await self.enqueue(
                p.error_frame(p.BAD_FRAME, f"subscription {sid!r} exists", request=request)
            )
            return
        if len(self._subs) + len(self._pending) >= self.hub.max_subscriptions:
            await self.enqueue(
                p.error_frame(
                    p.INVALID,
                    f"this connection has {self.hub.max_subscriptions} subscriptions, the limit",
                    request=request,
                )
            )
            return
        self._pending.add(sid)
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await self._open_sub(request, sid, pattern, header)
        except TimeoutError:
            await self.enqueue(
                p.error_frame(
                    p.UNAVAILABLE,
                    f"the hub's transport did not start {pattern!r} in {SUBSCRIBE_TIMEOUT} s",
                    request=request,
                )
            )
        finally:
            self._pending.discard(sid)

    async def _open_sub(self, request: int, sid: str, pattern: str, header: dict[str, Any]) -> None:
        try:
            # The hub's buffer holds at least what the spoke may have in flight
            # (its credit, bounded), so a burst the spoke can take is not
            # dropped here first.
            buffer = max(DEFAULT_BUFFER, min(header["credit"], MAX_SUB_BUFFER))
            sub = self.transport.subscribe(
                pattern,
                consumer=header.get("consumer"),
                start=header.get("start", "new"),
                buffer=buffer,
            )
            await sub.start()
        except ConsumerBusy as exc:
            await self.enqueue(p.error_frame(p.BUSY, str(exc), request=request))
            return
        except PubSubError as exc:
            await self.enqueue(p.error_frame(p.INVALID, str(exc), request=request))
            return
        hub_sub = _HubSub(sid, sub, header["credit"])
        self._pending.discard(sid)
        self._subs[sid] = hub_sub
        await self.enqueue(p.encode({"op": "subscribed", "id": request, "sub": sid}))
        hub_sub.task = asyncio.create_task(self._pump(hub_sub))

    async def _pump(self, hub_sub: _HubSub) -> None:
        sub, sid = hub_sub.sub, hub_sub.sid
        durable = sub.consumer is not None
        limit = self.hub.max_unacked
        try:
            async for event in sub:
                while hub_sub.credit <= 0:
                    hub_sub.has_credit.clear()
                    await hub_sub.has_credit.wait()
                if durable:
                    while len(hub_sub.unacked) >= limit:
                        hub_sub.room.clear()
                        await hub_sub.room.wait()
                    hub_sub.unacked[event.id] = event
                hub_sub.credit -= 1
                head: dict[str, Any] = {"op": "event", "sub": sid, "offset": event.offset}
                reported, stats = hub_sub.reported, sub.stats
                for name in REPORTED:
                    now = getattr(stats, name)
                    if now != reported[name] or name == "dropped":
                        head[name] = now - reported[name]
                        reported[name] = now
                await self.enqueue(p.encode(head, [event.envelope()]))
        except asyncio.CancelledError:
            raise
        except PubSubError as exc:
            await self.enqueue(
                p.encode({"op": "ended", "sub": sid, "code": p.UNAVAILABLE, "message": str(exc)})
            )
        except Exception:
            log.exception("hub: subscription %r failed", sub.pattern.text)
            await self.enqueue(
                p.encode({"op": "ended", "sub": sid, "code": p.UNAVAILABLE, "message": "hub error"})
            )

    async def _settle(self, op: str, header: dict[str, Any]) -> None:
        hub_sub = self._subs.get(header["sub"])
        event = hub_sub.unacked.pop(header["event"], None) if hub_sub is not None else None
        if hub_sub is None or event is None:
            return  # after a reconnect, or twice: the event comes again if it was not acked
        if not hub_sub.room.is_set():
            hub_sub.room.set()
        try:
            if op == "ack":
                await hub_sub.sub.ack(event)
            else:
                delay = header.get("delay", 0)
                await hub_sub.sub.nack(event, delay=delay, reason=header.get("reason"))
        except PubSubError as exc:
            await self.enqueue(p.error_frame(p.INVALID, str(exc), sub=hub_sub.sid))

    async def _end(self, hub_sub: _HubSub) -> None:
        if hub_sub.task is not None:
            hub_sub.task.cancel()
            with contextlib.suppress(BaseException):
                await hub_sub.task
        with contextlib.suppress(Exception, TimeoutError):
            async with asyncio.timeout(CLOSE_STEP_TIMEOUT):
                await hub_sub.sub.close()
