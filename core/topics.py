"""Topic grammar and pattern matching, identical on every transport.

A topic is one or more segments joined by ``:``; a segment is 1..128 characters
of ``[A-Za-z0-9_.-]``; the whole topic is at most 512 characters. A pattern may
use ``*`` for exactly one segment and a final ``>`` for one or more trailing
segments. Brokers whose own matching differs (Redis globs, NATS tokens) filter
client-side with :class:`Pattern`, so every transport agrees with this table.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .errors import InvalidTopic

SEPARATOR = ":"
MAX_TOPIC_LENGTH = 512
DEAD = "dead"
"""The reserved first segment of dead letters: ``dead:<original topic>``."""
DEAD_PREFIX = DEAD + SEPARATOR
MAX_DEAD_TOPIC_LENGTH = len(DEAD_PREFIX) + MAX_TOPIC_LENGTH
"""A dead letter's topic may be longer than a publisher's, by its prefix."""
MAX_SEGMENT_LENGTH = 128
_SEGMENT = re.compile(r"[A-Za-z0-9_.\-]{1,128}\Z")


def _check_segment(text: str, segment: str, index: int, kind: str) -> None:
    if not segment:
        raise InvalidTopic(
            f"{kind} {text!r}: segment {index + 1} is empty; "
            f"segments are joined by a single {SEPARATOR!r} with no leading or trailing one"
        )
    if len(segment) > MAX_SEGMENT_LENGTH:
        raise InvalidTopic(
            f"{kind} {text!r}: segment {index + 1} has {len(segment)} characters; "
            f"the limit is {MAX_SEGMENT_LENGTH}"
        )
    if not _SEGMENT.match(segment):
        bad = sorted({c for c in segment if not re.match(r"[A-Za-z0-9_.\-]", c)})
        raise InvalidTopic(
            f"{kind} {text!r}: segment {segment!r} contains {''.join(bad)!r}; "
            "use only letters, digits, '_', '.' and '-'"
        )


def _check_text(text: object, kind: str) -> str:
    if not isinstance(text, str):
        raise InvalidTopic(f"{kind} must be a str, got {type(text).__name__}: {text!r}")
    limit = MAX_DEAD_TOPIC_LENGTH if text.startswith(DEAD_PREFIX) else MAX_TOPIC_LENGTH
    if len(text) > limit:
        raise InvalidTopic(
            f"{kind} {text[:40]!r}... is {len(text)} characters; the limit is {limit}"
        )
    return text


def validate_topic(topic: str) -> str:
    """Return ``topic`` unchanged, or raise :class:`InvalidTopic` naming the rule it
    breaks. Dead-letter topics (``dead:...``) are valid here: readers see them."""
    return _validate_topic(_check_text(topic, "topic"))


def validate_publish_topic(topic: str) -> str:
    """Like :func:`validate_topic`, and refuse the reserved first segment ``dead``:
    only a durable transport writes dead letters."""
    if type(topic) is not str:
        _check_text(topic, "topic")  # raises, naming the type
    return _validate_publish_topic(topic)


@lru_cache(maxsize=65536)
def _validate_publish_topic(topic: str) -> str:
    # Cached like _validate_topic: the hot path is a topic published to before.
    _validate_topic(_check_text(topic, "topic"))
    if is_dead_letter(topic):
        raise InvalidTopic(
            f"topic {topic[:60]!r}: the first segment {DEAD!r} is reserved for dead letters; "
            "publish under another name"
        )
    return topic


def is_dead_letter(topic: str) -> bool:
    """True for a dead letter's topic (first segment ``dead``)."""
    return topic == DEAD or topic.startswith(DEAD_PREFIX)


@lru_cache(maxsize=65536)
def _validate_topic(topic: str) -> str:
    for i, segment in enumerate(topic.split(SEPARATOR)):
        if segment in ("*", ">"):
            raise InvalidTopic(
                f"topic {topic!r}: {segment!r} is a wildcard; publish to a concrete topic "
                "and use wildcards only in subscribe patterns"
            )
        _check_segment(topic, segment, i, "topic")
    return topic


class Pattern:
    """A validated subscription pattern that can test topics.

    ``Pattern("graph:*").matches("graph:created")`` is True;
    ``Pattern("call:>").matches("call:req-1:done")`` is True.
    """

    __slots__ = ("exact", "literal_prefix", "sees_dead", "segments", "tail", "text")

    def __init__(self, text: str) -> None:
        _check_text(text, "pattern")
        segments = text.split(SEPARATOR)
        for i, segment in enumerate(segments):
            if segment == "*":
                continue
            if segment == ">":
                if i != len(segments) - 1:
                    raise InvalidTopic(
                        f"pattern {text!r}: '>' may only be the last segment "
                        "(it matches one or more trailing segments)"
                    )
                continue
            _check_segment(text, segment, i, "pattern")
        self.text = text
        #: Only a pattern naming ``dead`` literally first matches dead letters,
        #: so ``orders:>`` or ``>`` never receive them (nor loop on them).
        self.sees_dead = segments[0] == DEAD
        self.tail = segments[-1] == ">"
        self.segments = tuple(segments[:-1] if self.tail else segments)
        self.exact = not self.tail and "*" not in self.segments
        prefix: list[str] = []
        for segment in self.segments:
            if segment == "*":
                break
            prefix.append(segment)
        #: The leading run of literal segments, used by brokers to narrow a server-side filter.
        self.literal_prefix = tuple(prefix)

    def matches(self, topic: str) -> bool:
        """True when ``topic`` (already a valid topic) is matched by this pattern."""
        if self.exact:
            return topic == self.text
        if not self.sees_dead and (topic == DEAD or topic.startswith(DEAD_PREFIX)):
            return False
        parts = topic.split(SEPARATOR)
        n = len(self.segments)
        if self.tail:
            if len(parts) <= n:
                return False
        elif len(parts) != n:
            return False
        for want, got in zip(self.segments, parts, strict=False):
            if want != "*" and want != got:
                return False
        return True

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def compile_pattern(text: str) -> Pattern:
    """Validate and compile ``text`` (cached)."""
    return _compile_pattern(_check_text(text, "pattern"))


@lru_cache(maxsize=16384)
def _compile_pattern(text: str) -> Pattern:
    return Pattern(text)


def matches(pattern: str, topic: str) -> bool:
    """True when ``pattern`` matches ``topic``; both are validated."""
    return compile_pattern(pattern).matches(validate_topic(topic))


def dead_letter_topic(topic: str) -> str:
    """The dead-letter topic for events of ``topic``: ``dead:<topic>``. Every
    valid topic has one; a dead letter's own topic is returned unchanged."""
    return topic if is_dead_letter(topic) else DEAD_PREFIX + topic
