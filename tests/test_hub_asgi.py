"""The hub as an ASGI app mounted in a Starlette application, next to the
application's own routes, under uvicorn: spokes connect at the mount path, the
application's HTTP routes keep working, and the app's lifespan closes the hub."""

from __future__ import annotations

import asyncio
import secrets
import urllib.request

import pytest
import uvicorn
from brokers import HOST, free_port
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import alkpubsub
from alkpubsub.conformance import unique
from alkpubsub.hub import Grant, Hub, tokens


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_hub_mounted_in_starlette_serves_spokes_and_the_app_keeps_its_routes() -> None:
    token = secrets.token_urlsafe(24)
    tenant = unique("t")
    hub = Hub("memory://asgi-{tenant}", auth=tokens({token: Grant(tenant)}))

    async def health(request: object) -> PlainTextResponse:
        return PlainTextResponse(f"ok {hub.connections}")

    app = Starlette(routes=[Route("/health", health), Mount("/events", app=hub)])
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host=HOST, port=port, log_level="warning", ws="websockets-sansio")
    )
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110  (uvicorn exposes a flag)
                await asyncio.sleep(0.01)
        # Starlette's Mount matches "/events/..." (a WebSocket cannot be redirected
        # from "/events" as HTTP is): the spoke's URL ends with the slash.
        spoke = await alkpubsub.connect(f"ws://{HOST}:{port}/events/?token={token}")
        try:
            assert spoke.tenant == tenant  # type: ignore[attr-defined]
            async with spoke.subscribe("orders:*") as sub:
                sent = await spoke.publish("orders:created", {"n": 1})
                got = await sub.get(timeout=5)
                assert got.id == sent.id and got.payload == {"n": 1}
                status, body = await asyncio.to_thread(_get, f"http://{HOST}:{port}/health")
                assert (status, body) == (200, "ok 1")
                # Plain HTTP at the hub's mount gets 426 (Upgrade Required), not a hang.
                status, body = await asyncio.to_thread(_get, f"http://{HOST}:{port}/events/")
                assert status == 426 and "WebSocket" in body
        finally:
            await spoke.close()
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await serving


async def test_hub_refuses_a_client_without_the_subprotocol() -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake

    token = secrets.token_urlsafe(24)
    hub = Hub("memory://asgi-{tenant}", auth=tokens({token: Grant(unique("t"))}))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(hub, host=HOST, port=port, log_level="warning", ws="websockets-sansio")
    )
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110  (uvicorn exposes a flag)
                await asyncio.sleep(0.01)
        with pytest.raises(InvalidHandshake):
            async with connect(
                f"ws://{HOST}:{port}/", additional_headers={"Authorization": f"Bearer {token}"}
            ) as ws:
                await ws.recv()
        assert hub.connections == 0
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await serving
