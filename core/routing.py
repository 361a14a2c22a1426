"""Fan-out index from topics to the subscriptions whose patterns match them.

Exact patterns are a dict lookup; wildcard patterns are tested once per new
topic and the answer is cached until the set of subscriptions changes. So the
cost of delivering one event does not grow with the number of subscribed
topics, which is what lets one read per wake serve thousands of subscriptions.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from .topics import Pattern


class HasPattern(Protocol):
    @property
    def pattern(self) -> Pattern: ...


S = TypeVar("S", bound=HasPattern)

_CACHE_LIMIT = 65536


class Router(Generic[S]):
    """Subscriptions indexed by pattern."""

    __slots__ = ("_cache", "_exact", "_wild")

    def __init__(self) -> None:
        self._exact: dict[str, list[S]] = {}
        self._wild: list[S] = []
        self._cache: dict[str, tuple[S, ...]] = {}

    def add(self, sub: S) -> bool:
        """Index ``sub``; True when it is the first subscription of its pattern."""
        self._cache.clear()
        pattern = sub.pattern
        if pattern.exact:
            subs = self._exact.setdefault(pattern.text, [])
            subs.append(sub)
            return len(subs) == 1
        first = all(s.pattern.text != pattern.text for s in self._wild)
        self._wild.append(sub)
        return first

    def remove(self, sub: S) -> bool:
        """Unindex ``sub``; True when no subscription of its pattern is left."""
        self._cache.clear()
        pattern = sub.pattern
        if pattern.exact:
            subs = self._exact.get(pattern.text, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._exact.pop(pattern.text, None)
                return True
            return False
        if sub in self._wild:
            self._wild.remove(sub)
        return all(s.pattern.text != pattern.text for s in self._wild)

    def match(self, topic: str) -> tuple[S, ...]:
        """Every subscription whose pattern matches ``topic``."""
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        found = list(self._exact.get(topic, ()))
        found.extend(s for s in self._wild if s.pattern.matches(topic))
        result = tuple(found)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[topic] = result
        return result

    def patterns(self) -> set[str]:
        """The distinct patterns subscribed."""
        return set(self._exact) | {s.pattern.text for s in self._wild}

    def __len__(self) -> int:
        return sum(len(v) for v in self._exact.values()) + len(self._wild)

    def __bool__(self) -> bool:
        return bool(self._exact) or bool(self._wild)
