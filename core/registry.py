"""Choosing a transport by URL scheme: ``await alkpubsub.connect(url)``.

Built-in schemes are listed here; third-party transports register a factory
under the entry-point group ``alkpubsub.transports`` (scheme -> factory). A
factory is called as ``factory(url, settings)`` and returns a transport (or an
awaitable of one); ``connect`` then awaits ``transport.connect()`` if it has one.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import entry_points
from typing import Any, cast

from .abilities import Connectable
from .config import Settings, parse_url, redact_url
from .errors import ConfigError
from .transport import Transport

Factory = Callable[[str, Settings], "Transport | Awaitable[Transport]"]

ENTRY_POINT_GROUP = "alkpubsub.transports"

# scheme -> (module, extra that provides its client library, or None)
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "memory": ("alkpubsub.transports.inprocess", None),
    "honker": ("alkpubsub.transports.honker", None),
    "honker+durable": ("alkpubsub.transports.honker_durable", None),
    "redis": ("alkpubsub.transports.redis", "redis"),
    "rediss": ("alkpubsub.transports.redis", "redis"),
    "redis+durable": ("alkpubsub.transports.redis_durable", "redis"),
    "rediss+durable": ("alkpubsub.transports.redis_durable", "redis"),
    "nats": ("alkpubsub.transports.nats", "nats"),
    "tls": ("alkpubsub.transports.nats", "nats"),
    "nats+durable": ("alkpubsub.transports.nats_durable", "nats"),
    "tls+durable": ("alkpubsub.transports.nats_durable", "nats"),
}
_CLIENT_MODULE = {"redis": "redis", "nats": "nats"}
_registered: dict[str, Factory] = {}


def register(scheme: str, factory: Factory) -> None:
    """Register ``factory`` for ``scheme`` in this process (tests, plugins)."""
    _registered[scheme.lower()] = factory


def schemes() -> list[str]:
    """Every scheme ``connect`` knows: built-in, registered and entry points."""
    found = set(_BUILTIN) | set(_registered)
    found |= {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(found)


def resolve(scheme: str) -> Factory:
    """The factory for ``scheme``, or :class:`ConfigError` saying what to install."""
    scheme = scheme.lower()
    if scheme in _registered:
        return _registered[scheme]
    if scheme in _BUILTIN:
        module_name, extra = _BUILTIN[scheme]
        if extra is not None:
            try:
                importlib.import_module(_CLIENT_MODULE[extra])
            except ImportError:
                raise ConfigError(
                    f"the {scheme}:// transport needs the {extra!r} extra; "
                    f"install it with: pip install 'alkpubsub[{extra}]'"
                ) from None
        module = importlib.import_module(module_name)
        return cast(Factory, module.from_url)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == scheme:
            return cast(Factory, ep.load())
    raise ConfigError(
        f"unknown transport scheme {scheme!r}; known: {', '.join(schemes())} "
        f"(third-party transports register under the entry-point group {ENTRY_POINT_GROUP!r})"
    )


async def open_transport(url: str, settings: Settings) -> Transport:
    """Build and connect one transport for ``url`` (no composites)."""
    parsed = parse_url(url)
    factory = resolve(parsed.scheme)
    made: Any = factory(url, settings)
    if inspect.isawaitable(made):
        made = await made
    transport = cast(Transport, made)
    if isinstance(transport, Connectable):
        try:
            await transport.connect()
        except BaseException:
            await transport.close()
            raise
    return transport


async def connect(target: str | Sequence[str] | Settings | None = None) -> Transport:
    """Open a transport chosen by configuration.

    ``target`` is a URL, a list of URLs (a composite; the first is the local
    leg), a :class:`Settings`, or None to read ``ALKPUBSUB_URL`` and friends
    from the environment.
    """
    if target is None:
        settings = Settings.load()
    elif isinstance(target, Settings):
        settings = target
    elif isinstance(target, str):
        settings = Settings.load(url=target)
    elif isinstance(target, Sequence):
        settings = Settings.load(url=list(target))
    else:
        raise ConfigError(f"connect() takes a URL, a list of URLs or Settings, not {target!r}")
    urls = settings.urls
    if not urls:
        raise ConfigError("no transport URL given; set ALKPUBSUB_URL or pass a URL")
    if len(urls) == 1:
        return await open_transport(urls[0], settings)
    from alkpubsub.composite import open_composite

    return await open_composite(urls, settings)


__all__ = ["ENTRY_POINT_GROUP", "connect", "open_transport", "redact_url", "register", "resolve"]
