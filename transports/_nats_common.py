"""What the NATS transports share: topic <-> subject mapping, connection
options from the URL and ``Settings`` (auth, TLS), and the size limits the
server's ``max_payload`` sets. The connection itself is in ``_nats_connection``.

Subjects (docs/decisions/005-nats-subjects-and-jetstream.md): a topic's ``:``
becomes NATS's token separator ``.``; a ``.`` inside a segment becomes ``~``
(legal in NATS subjects, illegal in topics, so the mapping is reversible); a
prefix keeps our traffic apart: ``graph:v1.2`` -> ``alk.graph.v1~2``. Patterns
map the same way (``*`` and a trailing ``>`` mean in NATS what they mean here),
so the server filters exactly; subscribers check ``Pattern.matches`` as well.
"""

from __future__ import annotations

import re
import ssl
from typing import Any

from alkpubsub.config import ParsedUrl, Settings, TransportOptions
from alkpubsub.errors import ConfigError, InvalidTopic, PayloadError
from alkpubsub.limits import MAX_HEADERS_BYTES, MAX_KEY_LENGTH, MAX_PAYLOAD_BYTES
from alkpubsub.topics import MAX_TOPIC_LENGTH, SEPARATOR, validate_topic

ESCAPE = "~"
"""Stands for a ``.`` inside a topic segment on the wire."""
DEFAULT_PORT = 4222
_PREFIX = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")


# -- subjects ---------------------------------------------------------------


def check_prefix(prefix: str, option: str = "prefix") -> str:
    """``prefix`` if it is empty or literal dot-separated subject tokens."""
    if prefix and not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            f"{option}={prefix!r} is not a literal NATS subject prefix; use tokens of "
            "[A-Za-z0-9_-] joined by '.', e.g. 'alk' or 'acme.events'"
        )
    return prefix


def to_subject(prefix: str, topic_or_pattern: str) -> str:
    """The subject for a topic, or the subject filter for a pattern."""
    tokens = topic_or_pattern.replace(".", ESCAPE).replace(SEPARATOR, ".")
    return f"{prefix}.{tokens}" if prefix else tokens


def to_topic(prefix: str, subject: str) -> str | None:
    """The topic a subject stands for, or None when it is not one of ours."""
    if prefix:
        if not subject.startswith(prefix + "."):
            return None
        subject = subject[len(prefix) + 1 :]
    topic = subject.replace(".", SEPARATOR).replace(ESCAPE, ".")
    try:
        return validate_topic(topic)
    except InvalidTopic:
        return None


def escape_name(name: str) -> str:
    """A consumer name as a JetStream consumer name (which may not contain ``.``)."""
    return name.replace(".", ESCAPE)


# -- sizes ------------------------------------------------------------------

ENVELOPE_HEAD = 256 + MAX_TOPIC_LENGTH + MAX_KEY_LENGTH + MAX_HEADERS_BYTES
"""Bytes an envelope takes besides its payload, at most: measured 17,578 for the
longest topic and key and 16 KiB of headers in one header (17,664 allowed).
Headers whose JSON needs escapes take more; the exact check at publish catches those."""


def fitting_payload(max_message: int, nats_headers: int) -> int:
    """The largest payload to accept when the server takes messages of at most
    ``max_message`` bytes and we add ``nats_headers`` bytes of NATS headers.

    Room is kept for the largest envelope head, but never more than half the
    message: on a server configured very small, events with small heads still
    go, and one whose head does not fit is refused by the exact check at
    publish (:func:`too_big`)."""
    reserve = min(ENVELOPE_HEAD + nats_headers, max_message // 2)
    return max(1, min(MAX_PAYLOAD_BYTES, max_message - reserve))


def too_big(subject: str, size: int, limit: int, what: str) -> PayloadError:
    """The error for a message of ``size`` bytes (envelope plus NATS headers) over
    ``limit``: nats-server would close the whole connection for it."""
    return PayloadError(
        f"the event on {subject!r} is {size} bytes with its envelope and headers, over "
        f"{what} of {limit} bytes; send a smaller payload or fewer/smaller headers"
    )


# -- options ----------------------------------------------------------------


class NatsConnectionOptions(TransportOptions):
    """Connection options both NATS transports accept."""

    name: str | None = None
    connect_timeout: float = 5.0
    reconnect_wait: float = 0.5
    reconnect_timeout: float = 60.0
    pending_size: int = 2 * 1024 * 1024
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_hostname: str | None = None


def check_positive(options: TransportOptions, url: ParsedUrl, *names: str) -> None:
    """Refuse options that must be > 0."""
    for name in names:
        value = getattr(options, name)
        if value is not None and value <= 0:
            raise ConfigError(f"option {name}={value!r} in {url.redacted!r} must be > 0")


def _tls_context(options: NatsConnectionOptions, settings: Settings | None) -> ssl.SSLContext:
    ca = options.tls_ca or (str(settings.tls_ca) if settings and settings.tls_ca else None)
    cert = options.tls_cert or (str(settings.tls_cert) if settings and settings.tls_cert else None)
    key = options.tls_key or (str(settings.tls_key) if settings and settings.tls_key else None)
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        # The exception names the file, never its content.
        raise ConfigError(f"cannot load TLS files (tls_ca/tls_cert/tls_key): {exc}") from None
    return context


def _wants_tls(url: ParsedUrl, options: NatsConnectionOptions, settings: Settings | None) -> bool:
    if url.base_scheme == "tls":
        return True
    if options.tls_ca or options.tls_cert:
        return True
    return bool(settings and (settings.tls_ca or settings.tls_cert))


def connect_kwargs(
    url: ParsedUrl, options: NatsConnectionOptions, settings: Settings | None
) -> dict[str, Any]:
    """Keyword arguments for ``nats.aio.client.Client.connect`` (without callbacks).

    Credentials go in their own arguments, never in the server URL, so nothing
    nats-py reports or logs carries them. ``nats://user:pass@host`` and
    ``nats://token@host`` win over ``Settings.username/password/token``.
    """
    tls = _wants_tls(url, options, settings)
    host = url.host or "localhost"
    if ":" in host:
        host = f"[{host}]"
    server = f"{'tls' if tls else 'nats'}://{host}:{url.port or DEFAULT_PORT}"
    kwargs: dict[str, Any] = {
        "servers": [server],
        "name": options.name,
        "connect_timeout": options.connect_timeout,
        "reconnect_time_wait": options.reconnect_wait,
        # Our own deadline (reconnect_timeout) decides when to give up.
        "max_reconnect_attempts": -1,
        "pending_size": options.pending_size,
    }
    if url.username is not None and url.password is not None:
        kwargs["user"], kwargs["password"] = url.username, url.password
    elif url.username is not None:
        kwargs["token"] = url.username
    elif settings is not None and settings.token is not None:
        kwargs["token"] = settings.token.get_secret_value()
    elif settings is not None and settings.username is not None:
        kwargs["user"] = settings.username
        if settings.password is not None:
            kwargs["password"] = settings.password.get_secret_value()
    if tls:
        kwargs["tls"] = _tls_context(options, settings)
        if options.tls_hostname:
            kwargs["tls_hostname"] = options.tls_hostname
    return kwargs
