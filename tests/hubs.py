"""A hub on a loopback port for the tests: ``alkpubsub.hub.Hub`` under uvicorn,
in this process's event loop, stopped and started again on the same port."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from typing import Any

import uvicorn
from brokers import HOST, free_port

from alkpubsub.hub import Grant, Hub, tokens


class HubServer:
    """``Hub(backend)`` served on ``HOST:port``; ``token(tenant)`` makes a token."""

    def __init__(
        self, backend: Any, *, grants: Mapping[str, Grant] | None = None, **hub_options: Any
    ) -> None:
        self.backend = backend
        self.port = free_port()
        self.grants: dict[str, Grant] = dict(grants or {})
        self.hub_options = hub_options
        self.hub: Hub | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    def token(self, tenant: str, **grant: Any) -> str:
        """A new token for ``tenant`` (publish/subscribe patterns as ``Grant``
        takes them); valid for hubs started from now on and the running one."""
        token = secrets.token_urlsafe(24)
        self.grants[token] = Grant(tenant, **grant)
        return token

    def url(self, token: str, path: str = "/events", **options: str) -> str:
        query = "&".join([f"token={token}", *(f"{k}={v}" for k, v in options.items())])
        return f"ws://{HOST}:{self.port}{path}?{query}"

    async def _authenticate(self, token: str | None) -> Grant | None:
        return await tokens(self.grants)(token) if self.grants else None

    async def start(self) -> None:
        self.hub = Hub(self.backend, auth=self._authenticate, **self.hub_options)
        config = uvicorn.Config(
            self.hub,
            host=HOST,
            port=self.port,
            log_level="warning",
            ws="websockets-sansio",
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        async with asyncio.timeout(10):
            while not self._server.started:
                if self._task.done():
                    await self._task  # raises why it did not start
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Close every spoke connection (4503) and stop listening."""
        if self._server is None or self._task is None:
            return
        if self.hub is not None:
            await self.hub.close()
        self._server.should_exit = True
        async with asyncio.timeout(15):
            await self._task
        self._server = self._task = None

    async def restart(self, down: float = 0.3) -> None:
        await self.stop()
        await asyncio.sleep(down)
        await self.start()

    async def __aenter__(self) -> HubServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
