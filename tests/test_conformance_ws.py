"""The ``ws://`` spoke transport against the shared conformance suite.

Each test runs its own hub (``tests/hubs.py``: ``alkpubsub.hub.Hub`` under
uvicorn, in the test's event loop) with a tenant of its own, and every
transport the factory makes is a spoke connected to it. The hub serves
``honker+durable`` (a file per tenant in the test's tmp dir) in one class and
``memory://hub-{tenant}`` in the other; the spoke declares what the hub's
transport for the tenant declares, plus cross_process and cross_node.

``other_process`` starts a child that connects to the same hub URL (served by
the hub in this process's loop). ``garbage_writer`` (honker+durable only)
writes foreign rows into the tenant's honker file from another process, as
``test_conformance_honker.py`` does: the hub's subscriptions skip them, and the
hub reports the count in the next ``event`` frame (``malformed``), so the
spoke's ``stats.malformed`` counts them. A raw WebSocket client cannot put
garbage where a subscription reads (the hub validates every envelope at
publish: ``test_ws.py`` covers that), and the memory backend has no wire.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
from hubs import HubServer
from test_honker import write_foreign_rows
from test_honker_durable import garbage_stream_rows

import alkpubsub
from alkpubsub.conformance import (
    GarbageWriter,
    OtherProcess,
    TransportFactory,
    TransportSuite,
    unique,
)
from alkpubsub.conformance.restart import BrokerRestartSuite


@pytest.fixture
def tenant() -> str:
    return unique("ten")


class ThreadHub:
    """A :class:`HubServer` in a thread with its own event loop."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.server: HubServer | None = None

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def __enter__(self) -> HubServer:
        self._thread.start()

        async def start() -> HubServer:
            server = HubServer(self.backend)
            await server.start()
            return server

        self.server = self._run(start())
        return self.server

    def __exit__(self, *exc: object) -> None:
        try:
            if self.server is not None:
                self._run(self.server.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


class _HubSuite:
    """The fixtures both classes share; ``backend`` says what the hub serves."""

    @pytest.fixture
    def backend(self, tmp_path: Path) -> str:
        raise NotImplementedError

    @pytest_asyncio.fixture
    async def loop_hub(self, backend: str) -> AsyncIterator[HubServer]:
        async with HubServer(backend) as hs:
            yield hs

    @pytest.fixture
    def thread_hub(self, backend: str) -> Iterator[HubServer]:
        with ThreadHub(backend) as hs:
            yield hs

    @pytest.fixture
    def hub(self, request: pytest.FixtureRequest) -> HubServer:
        # The hub runs in the test's event loop. The suite's hypothesis cases are
        # plain functions that run their own loop (asyncio.Runner) while the
        # test's loop is idle, so for them the hub gets a thread and a loop of
        # its own.
        if inspect.iscoroutinefunction(request.function):
            return cast(HubServer, request.getfixturevalue("loop_hub"))
        return cast(HubServer, request.getfixturevalue("thread_hub"))

    @pytest.fixture
    def url(self, hub: HubServer, tenant: str) -> str:
        return hub.url(hub.token(tenant))

    @pytest.fixture
    def other_process(self, url: str) -> OtherProcess:
        return OtherProcess(url)

    @pytest.fixture
    def factory(self, url: str) -> TransportFactory:
        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make


class TestWsHonkerDurableConformance(_HubSuite, TransportSuite):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> str:
        return f"honker+durable://{tmp_path}?tenant={{tenant}}"

    @pytest.fixture
    def garbage_writer(self, tmp_path: Path, tenant: str) -> GarbageWriter:
        async def write(topic: str) -> int:
            rows = garbage_stream_rows("events", topic)
            await write_foreign_rows(str(tmp_path / f"tenant-{tenant}.db"), rows)
            return len(rows)

        return write


class TestWsMemoryConformance(_HubSuite, TransportSuite):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> str:
        # The tenant is unique per test, so is the hub's in-process bus.
        return "memory://hub-{tenant}"


class _HubBroker:
    """The hub as the restart suite's broker: its cases call ``restart`` from a
    worker thread (``asyncio.to_thread``) while the test's loop, which serves
    the hub, keeps running."""

    def __init__(self, server: HubServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def restart(self, downtime: float = 0) -> None:
        self._run(self.server.restart(down=downtime))

    def kill(self) -> None:
        self._run(self.server.stop())

    def start(self) -> None:
        self._run(self.server.start())


class _HubRestart(BrokerRestartSuite):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> str:
        raise NotImplementedError

    @pytest_asyncio.fixture
    async def hub(self, backend: str) -> AsyncIterator[HubServer]:
        async with HubServer(backend) as hs:
            yield hs

    @pytest_asyncio.fixture
    async def broker(self, hub: HubServer) -> _HubBroker:
        return _HubBroker(hub, asyncio.get_running_loop())

    @pytest.fixture
    def url(self, hub: HubServer, tenant: str) -> str:
        return hub.url(hub.token(tenant))

    @pytest.fixture
    def factory(self, url: str) -> TransportFactory:
        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make


class TestWsHonkerDurableHubRestart(_HubRestart):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> str:
        return f"honker+durable://{tmp_path}?tenant={{tenant}}"


class TestWsMemoryHubRestart(_HubRestart):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> str:
        return "memory://hub-{tenant}"
