"""Who may connect to a hub, as which tenant, and to which topics.

An **authenticator** is an async callable ``token -> Grant | None`` (None:
refused). :func:`tokens` builds one from a fixed table; applications pass their
own (a database lookup, a JWT check) to :class:`~alkpubsub.hub.Hub`.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from alkpubsub.errors import ConfigError
from alkpubsub.storage.stores import check_org_id
from alkpubsub.topics import compile_pattern


def covers(granted: str, wanted: str) -> bool:
    """True if every topic pattern ``wanted`` matches is matched by ``granted``."""
    g, w = granted.split(":"), wanted.split(":")
    if w[0] == "dead" and g[0] != "dead":
        # Wildcards never match dead letters (alkpubsub.topics): only a grant
        # that names dead:... covers them.
        return False
    for i, part in enumerate(g):
        if part == ">":
            return i < len(w)
        if i >= len(w) or w[i] == ">":
            return False
        if part != "*" and (w[i] == "*" or w[i] != part):
            return False
    return len(g) == len(w)


@dataclass(frozen=True)
class Grant:
    """What one token allows: the tenant whose transport it reaches, and the
    patterns it may publish to and subscribe to (``>``: everything)."""

    tenant: str
    publish: tuple[str, ...] = (">",)
    subscribe: tuple[str, ...] = (">", "dead:>")
    """Wildcards never cover dead letters (as they never match them): the
    default names ``dead:>`` too, and a narrower grant lists ``dead:...`` where
    its spokes may read dead letters."""
    _publish_matchers: tuple[Callable[[str], bool], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        check_org_id(self.tenant)
        for pattern in (*self.publish, *self.subscribe):
            compile_pattern(pattern)  # raises InvalidTopic for a bad one
        matchers = tuple(compile_pattern(p).matches for p in self.publish)
        object.__setattr__(self, "_publish_matchers", matchers)

    def may_publish(self, topic: str) -> bool:
        return any(match(topic) for match in self._publish_matchers)

    def may_subscribe(self, pattern: str) -> bool:
        return any(covers(granted, pattern) for granted in self.subscribe)


Authenticator = Callable[[str | None], Awaitable[Grant | None]]


def tokens(table: Mapping[str, Grant]) -> Authenticator:
    """An authenticator for a fixed ``{token: Grant}`` table (constant-time compare)."""
    entries = [(token.encode(), grant) for token, grant in table.items()]
    for token, _ in entries:
        if len(token) < 16:
            raise ConfigError(
                "hub tokens must be at least 16 characters; use secrets.token_urlsafe()"
            )

    async def authenticate(token: str | None) -> Grant | None:
        if not token:
            return None
        given = token.encode()
        found = None
        for known, grant in entries:
            if hmac.compare_digest(known, given):
                found = grant
        return found

    return authenticate


def grants_from_spec(specs: Iterable[str]) -> dict[str, Grant]:
    """``TOKEN=TENANT[;pub=P,P][;sub=P,P]`` strings (the CLI's ``--token``) as a table."""
    table: dict[str, Grant] = {}
    for spec in specs:
        token, eq, rest = spec.partition("=")
        if not eq or not token or not rest:
            raise ConfigError("a --token spec is malformed: write TOKEN=TENANT[;pub=...][;sub=...]")
        tenant, *parts = rest.split(";")
        kwargs: dict[str, tuple[str, ...]] = {}
        for part in parts:
            name, eq, patterns = part.partition("=")
            if name not in ("pub", "sub") or not eq:
                raise ConfigError(f"--token ...={tenant};{part}: use pub=PATTERNS or sub=PATTERNS")
            key = "publish" if name == "pub" else "subscribe"
            kwargs[key] = tuple(p for p in patterns.split(",") if p)
        table[token] = Grant(tenant, **kwargs)
    return table
