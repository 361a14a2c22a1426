"""Fixtures and helpers the conformance cases share."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from alkpubsub import Capabilities, Event, Subscription, Transport

TransportFactory = Callable[[], Awaitable[Transport]]
"""Returns a new, connected transport on the same bus, file or broker as every
other transport the same factory returns (so one can publish and another
receive). Isolating one test from the next is the factory's job."""

RECEIVE_TIMEOUT = 10.0
"""Upper bound for an expected event to arrive; generous for slow CI machines."""
QUIET = 0.3
"""How long a subscription must stay silent to count as having nothing more."""


async def collect(sub: Subscription, count: int, timeout: float = RECEIVE_TIMEOUT) -> list[Event]:
    """Exactly ``count`` events from ``sub``, or fail saying how many arrived."""
    got: list[Event] = []
    try:
        async with asyncio.timeout(timeout):
            while len(got) < count:
                got.append(await sub.__anext__())
    except TimeoutError:
        pytest.fail(f"{sub!r}: {len(got)} of {count} events arrived within {timeout} s")
    return got


async def collect_acking(
    sub: Subscription, count: int, timeout: float = RECEIVE_TIMEOUT
) -> list[Event]:
    """Like :func:`collect`, acking each event as it arrives."""
    got: list[Event] = []
    try:
        async with asyncio.timeout(timeout):
            while len(got) < count:
                event = await sub.__anext__()
                await sub.ack(event)
                got.append(event)
    except TimeoutError:
        pytest.fail(f"{sub!r}: {len(got)} of {count} events arrived within {timeout} s")
    return got


async def nothing_more(sub: Subscription, within: float = QUIET) -> None:
    """Fail if ``sub`` yields anything within ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            extra = await sub.__anext__()
    except (TimeoutError, StopAsyncIteration):
        return
    pytest.fail(f"{sub!r}: unexpected event {extra.topic!r} {extra.payload!r}")


NOT_DECLARED = "capability not declared: "
"""How a case that needs a capability says it did not run (see :func:`require`)."""
NOT_APPLICABLE = "not applicable: "
"""How a case says the transport has nothing for it to test (no wire, ...)."""


def require(caps: Capabilities, name: str) -> None:
    """Skip the case, naming the capability, unless the transport declares it."""
    if name not in caps.names():
        pytest.skip(f"{NOT_DECLARED}{name}")


def unique(prefix: str = "t") -> str:
    """A fresh topic segment, so cases never see each other's events."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


class SuiteFixtures:
    """The fixtures a suite subclass gets. Subclasses provide ``factory``.

    Every coroutine case is marked for pytest-asyncio when its class is
    defined, so the suite runs under ``asyncio_mode = "strict"`` as well as "auto"."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in vars(cls).items():
            if name.startswith("test_") and inspect.iscoroutinefunction(value):
                marks = getattr(value, "pytestmark", [])
                if not any(m.name == "asyncio" for m in marks):
                    pytest.mark.asyncio(value)

    @pytest.fixture
    def factory(self) -> TransportFactory:
        raise NotImplementedError(
            "define a `factory` fixture returning an async callable that makes a new "
            "connected transport (see alkpubsub/conformance/README.md)"
        )

    @pytest_asyncio.fixture
    async def connect(self, factory: TransportFactory) -> AsyncIterator[TransportFactory]:
        """Like ``factory``, and closes every transport it made at teardown."""
        made: list[Transport] = []

        async def make() -> Transport:
            transport = await factory()
            made.append(transport)
            return transport

        yield make
        for transport in reversed(made):
            await asyncio.wait_for(transport.close(), 30)

    @pytest_asyncio.fixture
    async def transport(self, connect: TransportFactory) -> Transport:
        """One transport for cases that need just one."""
        return await connect()

    @pytest.fixture
    def caps(self, transport: Transport) -> Capabilities:
        """The capabilities the transport under test declares."""
        return transport.capabilities
