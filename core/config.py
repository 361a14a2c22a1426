"""Configuration: ``Settings`` from the environment or a TOML file, URL parsing,
per-transport options, and redaction so secrets never reach logs or errors.

Every transport reads its tuning from its URL's query string (``?stream=events``)
and falls back to ``Settings``; unknown or malformed options raise
:class:`ConfigError` naming the option and the ones that exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .errors import ConfigError

DEFAULT_URL = "honker:///./alkpubsub.db"
CONFIG_ENV = "ALKPUBSUB_CONFIG"


def redact_url(url: str) -> str:
    """``url`` with any password or token replaced by ``***``, however it is written.

    A password with an unencoded ``/``, ``?`` or ``#`` moves the ``@`` out of
    what a URL parser calls the netloc, so the user info is found here by the
    last ``@`` after ``scheme://`` instead: everything before it is masked
    (keeping a plain user name), which may hide more than needed but never a secret.
    """
    if not isinstance(url, str):
        return "<not a URL>"
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url if "@" not in url else "<URL with user info>"
    at = rest.rfind("@") if not rest.startswith("/") else -1
    if at != -1:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, colon, _ = userinfo.partition(":")
        if colon and not any(c in user for c in "/?#"):
            rest = f"{user}:***@{rest}"
        else:
            # A lone user info is a token for NATS: secret too.
            rest = f"***@{rest}"
    head, qmark, query = rest.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret_key(k) for k, _ in pairs):
            query = "&".join(
                f"{k}=***" if _is_secret_key(k) else f"{k}={quote(v)}" for k, v in pairs
            )
        rest = f"{head}?{query}{hash_}{fragment}"
    return f"{scheme}://{rest}"


def _is_secret_key(key: str) -> bool:
    k = key.lower()
    return any(word in k for word in ("pass", "token", "secret", "key", "nkey", "creds"))


@dataclass(frozen=True)
class ParsedUrl:
    """A transport URL split into parts. ``password`` is kept out of ``repr``."""

    scheme: str
    host: str | None
    port: int | None
    path: str
    username: str | None
    password: str | None = field(repr=False)
    query: dict[str, str]
    raw: str = field(repr=False)

    @property
    def redacted(self) -> str:
        """The URL with secrets masked, for messages."""
        return redact_url(self.raw)

    def __repr__(self) -> str:
        # A NATS token sits where a user name would, and options may carry
        # secrets (?token=...): show only the redacted URL.
        return f"ParsedUrl({self.redacted!r})"

    @property
    def base_scheme(self) -> str:
        """The scheme without a ``+durable`` suffix."""
        return self.scheme.split("+", 1)[0]


def parse_url(url: str) -> ParsedUrl:
    """Split ``url``; raise :class:`ConfigError` when it cannot be read."""
    if not isinstance(url, str) or ("://" not in url and not url.startswith("memory:")):
        raise ConfigError(
            f"{url!r} is not a transport URL; expected e.g. 'memory://', "
            "'honker:///path/events.db', 'redis://host:6379/0' or 'nats://host:4222'"
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"cannot parse URL {redact_url(url)!r}: {exc}") from None
    after = url.partition("://")[2]
    if after.count("@") > parts.netloc.count("@") and not after.startswith("/"):
        raise ConfigError(
            f"URL {redact_url(url)!r} has an '@' after its host part: if it ends a "
            "user:password, percent-encode '/', '?' and '#' in the password "
            "(urllib.parse.quote(password, safe='')); if it belongs to a path or option, "
            "write it as %40"
        )
    try:
        port = parts.port
    except ValueError as exc:
        reason = _no_secret(exc, parts)
        raise ConfigError(f"cannot parse URL {redact_url(url)!r}: {reason}") from None
    query: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in query:
            raise ConfigError(f"option {k!r} is given twice in {redact_url(url)!r}")
        query[k] = v
    return ParsedUrl(
        scheme=parts.scheme.lower(),
        host=parts.hostname,
        port=port,
        path=unquote(parts.path),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        query=query,
        raw=url,
    )


def _no_secret(exc: ValueError, parts: SplitResult) -> str:
    """The parser's message, unless it quotes part of the user info."""
    text = str(exc)
    if any(part and part in text for part in (parts.password, parts.username)):
        return "the port is not a number"
    return text


class Settings(BaseSettings):
    """Deployment configuration, from ``ALKPUBSUB_*`` environment variables, a
    TOML file (``ALKPUBSUB_CONFIG=path.toml`` or :meth:`from_toml`) or code.

    ``url`` picks the transport; a list makes a composite whose first entry is
    the local leg. Credentials and TLS files given here apply to URLs that do
    not carry their own. Secrets are ``SecretStr`` and are masked in reprs.
    """

    model_config = SettingsConfigDict(
        env_prefix="ALKPUBSUB_", extra="forbid", validate_default=True, frozen=True
    )

    url: str | list[str] = DEFAULT_URL
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    buffer: int = 1024
    max_deliveries: int = 5
    origin: str | None = None
    """The ``origin`` stamped on this process's events (default: pid plus a
    random part). It must be unique per process: a composite drops events of
    its own origin coming back from a target as echoes of its own publishes."""
    composite_timeout: float = 5.0
    """Seconds a composite waits for each target to accept an event (0: no
    limit); a target URL's ``composite_timeout`` option wins."""
    options: dict[str, str] = {}
    """Transport options applied to every URL (a URL's own query wins)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get(CONFIG_ENV)
        if path:
            if not Path(path).is_file():
                raise ConfigError(f"{CONFIG_ENV}={path!r} is not a file; point it at a TOML file")
            # Read like from_toml: top-level keys or an [alkpubsub] table.
            sources.append(InitSettingsSource(settings_cls, init_kwargs=_read_toml(path)))
        return tuple(sources)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **overrides: Any) -> Settings:
        """Settings from a TOML file (top-level keys, or an ``[alkpubsub]`` table)."""
        return cls.load(**{**_read_toml(path), **overrides})

    @classmethod
    def load(cls, **values: Any) -> Settings:
        """Build settings, turning validation errors into :class:`ConfigError`."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(f"invalid settings: {_describe(exc)}") from None

    @property
    def urls(self) -> list[str]:
        """``url`` as a list."""
        return [self.url] if isinstance(self.url, str) else list(self.url)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name == "url":
                value = (
                    [redact_url(u) for u in self.urls]
                    if isinstance(value, list)
                    else (redact_url(value) if isinstance(value, str) else value)
                )
            elif name == "options" and isinstance(value, dict):
                value = {k: "***" if _is_secret_key(k) else v for k, v in value.items()}
            yield name, value


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A settings file's values: its ``[alkpubsub]`` table, or its top-level keys."""
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read settings file {str(path)!r}: {exc}") from None
    table = data.get("alkpubsub", data)
    return table if isinstance(table, dict) else data


class TransportOptions(BaseModel):
    """Base of each transport's options model: unknown names are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


OptionsT = TypeVar("OptionsT", bound=TransportOptions)


def parse_options(
    model: type[OptionsT], url: ParsedUrl, settings: Settings | None, **extra: Any
) -> OptionsT:
    """Options for a transport from ``settings.options`` overlaid by the URL's query."""
    values: dict[str, Any] = {}
    if settings is not None:
        values.update({k: v for k, v in settings.options.items() if k in model.model_fields})
    values.update(url.query)
    values.update(extra)
    unknown = sorted(set(url.query) - set(model.model_fields))
    if unknown:
        raise ConfigError(
            f"unknown option {unknown[0]!r} in {url.redacted!r}; "
            f"{url.scheme} accepts: {', '.join(sorted(model.model_fields)) or 'none'}"
        )
    try:
        return model(**values)
    except ValidationError as exc:
        raise ConfigError(f"bad option in {url.redacted!r}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "value"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
