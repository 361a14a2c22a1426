"""Choosing a transport by URL scheme (``alkpubsub.connect`` and the registry)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from importlib.metadata import distribution, entry_points

import pytest

import alkpubsub
from alkpubsub import BaseTransport, ConfigError, Settings, registry
from alkpubsub.transports.inprocess import InProcessTransport
from alkpubsub.transports.inprocess import from_url as memory_from_url

BUILTIN_SCHEMES = {
    "memory",
    "honker",
    "honker+durable",
    "redis",
    "redis+durable",
    "nats",
    "nats+durable",
}


@pytest.fixture(autouse=True)
def restore_registrations() -> Iterator[None]:
    """register() is process-wide; undo what a test registers."""
    saved = dict(registry._registered)
    yield
    registry._registered.clear()
    registry._registered.update(saved)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("URL", "CONFIG", "ORIGIN", "PASSWORD", "TOKEN"):
        monkeypatch.delenv(f"ALKPUBSUB_{name}", raising=False)


class RecordingTransport(BaseTransport):
    """A transport that records what connect() did with it."""

    name = "recording"

    def __init__(self, url: str, settings: Settings, *, fail: bool = False) -> None:
        super().__init__(origin=settings.origin)
        self.url = url
        self.settings = settings
        self.fail = fail
        self.connected = 0

    async def connect(self) -> None:
        self.connected += 1
        if self.fail:
            raise ConnectionRefusedError("broker is down")


async def test_unknown_scheme_raises_config_error_listing_known_schemes() -> None:
    with pytest.raises(ConfigError) as caught:
        await alkpubsub.connect("kafka://broker:9092")
    message = str(caught.value)
    assert "unknown transport scheme 'kafka'" in message
    for scheme in BUILTIN_SCHEMES:
        assert scheme in message
    assert "'alkpubsub.transports'" in message  # where a third party would register


@pytest.mark.parametrize(
    ("url", "extra"),
    [
        ("redis://127.0.0.1:1/0", "redis"),
        ("rediss://127.0.0.1:1/0", "redis"),
        ("redis+durable://127.0.0.1:1/0", "redis"),
        ("nats://127.0.0.1:1", "nats"),
        ("tls://127.0.0.1:1", "nats"),
        ("nats+durable://127.0.0.1:1", "nats"),
    ],
)
async def test_missing_extra_raises_config_error_with_pip_install_line(
    url: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mocked: both clients are installed in the test environment, so "the extra is
    # not installed" cannot happen for real here. A None entry in sys.modules makes
    # `import redis` / `import nats` raise ImportError, as an absent package would.
    monkeypatch.setitem(sys.modules, extra, None)
    with pytest.raises(ConfigError) as caught:
        await alkpubsub.connect(url)
    message = str(caught.value)
    assert f"pip install 'alkpubsub[{extra}]'" in message
    assert f"needs the {extra!r} extra" in message


async def test_connect_without_argument_reads_alkpubsub_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ALKPUBSUB_URL", "memory://x")
    monkeypatch.setenv("ALKPUBSUB_ORIGIN", "worker-1")
    transport = await alkpubsub.connect()
    try:
        assert isinstance(transport, InProcessTransport)
        assert transport.name == "memory://x"
        assert transport.origin == "worker-1"
    finally:
        await transport.close()


async def test_connect_accepts_settings() -> None:
    transport = await alkpubsub.connect(Settings.load(url="memory://y", origin="svc-a"))
    try:
        assert transport.name == "memory://y"
        assert transport.origin == "svc-a"
    finally:
        await transport.close()


@pytest.mark.parametrize("target", [42, b"memory://"], ids=repr)
async def test_connect_refuses_what_is_not_a_url_list_or_settings(target: object) -> None:
    with pytest.raises(ConfigError):
        await alkpubsub.connect(target)  # type: ignore[arg-type]


async def test_connect_with_empty_url_list_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="no transport URL given"):
        await alkpubsub.connect([])


def test_installed_distribution_declares_every_builtin_scheme_as_entry_point() -> None:
    group = entry_points(group=registry.ENTRY_POINT_GROUP)
    assert set(group.names) >= BUILTIN_SCHEMES
    # ... declared by alkpubsub itself, pointing at the module the registry imports.
    ours = {
        ep.name: ep.value
        for ep in distribution("alkpubsub").entry_points
        if ep.group == registry.ENTRY_POINT_GROUP
    }
    for scheme, (module, _extra) in registry._BUILTIN.items():
        assert ours[scheme] == f"{module}:from_url", scheme


def test_memory_entry_point_loads_the_in_process_factory() -> None:
    (memory,) = entry_points(group=registry.ENTRY_POINT_GROUP, name="memory")
    assert memory.load() is memory_from_url


def test_schemes_lists_builtin_and_registered() -> None:
    alkpubsub.register("Acme", lambda url, settings: RecordingTransport(url, settings))
    known = registry.schemes()
    assert set(known) >= BUILTIN_SCHEMES
    assert "acme" in known  # schemes are case-insensitive, stored lower-case
    assert known == sorted(known)


async def test_registered_factory_wins_over_builtin_scheme() -> None:
    made: list[RecordingTransport] = []

    def factory(url: str, settings: Settings) -> RecordingTransport:
        made.append(RecordingTransport(url, settings))
        return made[-1]

    alkpubsub.register("memory", factory)
    transport = await alkpubsub.connect("memory://bus")
    try:
        assert transport is made[0]
        assert made[0].url == "memory://bus"
        assert made[0].connected == 1  # connect() awaited the transport's connect()
    finally:
        await transport.close()


async def test_registered_factory_wins_even_when_the_extra_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Mocked missing client, as above: a registered factory needs no redis package.
    monkeypatch.setitem(sys.modules, "redis", None)
    alkpubsub.register("redis", lambda url, settings: RecordingTransport(url, settings))
    transport = await alkpubsub.connect("redis://cache.local/0")
    try:
        assert isinstance(transport, RecordingTransport)
    finally:
        await transport.close()


async def test_async_factory_is_awaited_and_gets_settings() -> None:
    async def factory(url: str, settings: Settings) -> RecordingTransport:
        return RecordingTransport(url, settings)

    alkpubsub.register("acme", factory)
    transport = await alkpubsub.connect(Settings.load(url="ACME://h", origin="o-1"))
    try:
        assert isinstance(transport, RecordingTransport)
        assert transport.settings.origin == "o-1"
        assert transport.origin == "o-1"
        assert transport.connected == 1
    finally:
        await transport.close()


async def test_transport_is_closed_when_its_connect_fails() -> None:
    made: list[RecordingTransport] = []

    def factory(url: str, settings: Settings) -> RecordingTransport:
        made.append(RecordingTransport(url, settings, fail=True))
        return made[-1]

    alkpubsub.register("acme", factory)
    with pytest.raises(ConnectionRefusedError, match="broker is down"):
        await alkpubsub.connect("acme://h")
    assert made[0].closed
