"""The targets of a composite: which must accept an event, how long each may
take, and what each has done so far.

A target's policy is written in its URL, so a deployment configures the whole
composite in one list (``ALKPUBSUB_URL`` or ``Settings.url``)::

    ["memory://",
     "honker+durable:///data/app.db",                       # required, default timeout
     "nats://hub:4222?composite_required=false&composite_timeout=0.2"]

``composite_required`` (default ``true``) and ``composite_timeout`` (seconds,
default ``Settings.composite_timeout``) are read and removed here; the rest of
the URL goes to the target's own transport.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from urllib.parse import parse_qsl, unquote_plus, urlsplit

from alkpubsub.config import redact_url
from alkpubsub.errors import ConfigError

REQUIRED = "composite_required"
TIMEOUT = "composite_timeout"
OPTIONS = (REQUIRED, TIMEOUT)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True, slots=True)
class LegPolicy:
    """How the composite treats one target."""

    required: bool = True
    """A failure (or timeout) of a required target fails the publish with
    :class:`PublishError`; an optional target's failure is counted and logged."""
    timeout: float | None = None
    """Seconds to wait for this target to accept an event (None: no limit)."""


@dataclass(slots=True)
class LegStats:
    """What one target of a composite has done (``CompositeTransport.leg_stats``)."""

    name: str
    required: bool
    timeout: float | None
    accepted: int = 0
    """Events this target accepted."""
    failed: int = 0
    """Publishes this target failed (timeouts included)."""
    timed_out: int = 0
    """Of ``failed``: publishes that ran past ``timeout``."""
    last_error: str | None = None

    def as_dict(self) -> dict[str, object]:
        """A plain dict, for logs and the CLI."""
        return asdict(self)


def split_policy(url: str, default_timeout: float | None) -> tuple[str, LegPolicy]:
    """``url`` without the composite's own options, and the policy they set."""
    pairs = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    ours = {k: v for k, v in pairs if k in OPTIONS}
    if not ours:
        return url, LegPolicy(timeout=default_timeout)
    # Cut the options out of the text itself: re-encoding the rest (or
    # urlunsplit, which drops the "//" of "scheme:///path") would change it.
    head, _, rest = url.partition("?")
    query, hash_, fragment = rest.partition("#")
    kept = [
        item for item in query.split("&") if unquote_plus(item.partition("=")[0]) not in OPTIONS
    ]
    leg_url = head + ("?" + "&".join(kept) if kept else "") + hash_ + fragment
    return leg_url, LegPolicy(
        required=_flag(ours.get(REQUIRED, "true"), url),
        timeout=_seconds(ours[TIMEOUT], url) if TIMEOUT in ours else default_timeout,
    )


def has_policy(url: str) -> bool:
    """True when ``url`` carries a composite option (refused on the local leg)."""
    return any(k in OPTIONS for k, _ in parse_qsl(urlsplit(url).query))


def _flag(text: str, url: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(
        f"{REQUIRED}={text!r} in {redact_url(url)!r} is not a boolean; write true or false"
    )


def _seconds(text: str, url: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"{TIMEOUT}={text!r} in {redact_url(url)!r} must be seconds >= 0 (0: no limit)"
        )
    return value or None
