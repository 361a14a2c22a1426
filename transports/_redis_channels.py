"""Which channels and globs one Redis pub/sub connection holds, and what the
server holds right now.

A subscription needs one server-side subscription, its *natural key*: an exact
pattern the channel ``prefix + topic`` (SUBSCRIBE), a wildcard pattern the glob
``prefix + literal prefix + "*"`` (PSUBSCRIBE). Keys covered by a glob that is
also needed are not subscribed: the server would send every message once per
matching subscription, doubling what it buffers for a slow reader (Redis cuts a
pub/sub client at 32 MB of output buffer). So the connection holds the
smallest set of keys that covers every subscription.

The server's state is followed from its confirmations, in the order they
arrive on the connection: a message that arrives while two held keys match
its channel (only while the set changes) is delivered through one of them.
Topic segments and prefixes are ``[A-Za-z0-9_.-]`` and ``:``, so a glob is its
literal prefix plus ``*`` and covering is a prefix test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from alkpubsub.topics import Pattern

SUB, PAT = b"s", b"p"
Key = tuple[bytes, bytes]
"""A server-side subscription: ``(SUB, channel)`` or ``(PAT, glob)``."""


def natural_key(prefix: bytes, pattern: Pattern) -> Key:
    """The key that delivers every topic ``pattern`` matches."""
    if pattern.exact:
        return (SUB, prefix + pattern.text.encode())
    literal = "".join(f"{segment}:" for segment in pattern.literal_prefix)
    return (PAT, prefix + literal.encode() + b"*")


class ChannelPlan:
    """Needed keys (counted per subscription), the covering set to hold, and
    the server's state as read from the connection."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self._need: dict[Key, int] = {}
        self._need_globs: set[bytes] = set()  # literal prefixes of needed globs
        self.wanted: set[Key] = set()  # the covering set
        # The server, as of the last frame read from the current connection:
        self._held: set[Key] = set()
        self._held_globs: set[bytes] = set()
        self._told: set[Key] = set()  # keys whose last command sent was a subscribe
        self._unsubs: dict[Key, int] = {}  # unsubscribes sent, not yet confirmed

    # -- what the subscriptions need ----------------------------------------

    def add(self, key: Key) -> None:
        """One more subscription needs ``key``."""
        count = self._need.get(key, 0)
        self._need[key] = count + 1
        if count:
            return
        if not self._covered(key, self._need_globs):
            self.wanted.add(key)
        if key[0] == PAT:
            literal = key[1][:-1]
            self._need_globs.add(literal)
            self.wanted -= {k for k in self.wanted if k != key and _under(k, literal)}

    def remove(self, key: Key) -> None:
        """A subscription that needed ``key`` ended."""
        count = self._need.get(key, 0)
        if count > 1:
            self._need[key] = count - 1
            return
        self._need.pop(key, None)
        self.wanted.discard(key)
        if key[0] == PAT:
            literal = key[1][:-1]
            self._need_globs.discard(literal)
            for k in self._need:
                if _under(k, literal) and not self._covered(k, self._need_globs):
                    self.wanted.add(k)

    # -- commands and confirmations -------------------------------------------

    def changes(self) -> tuple[list[Key], list[Key]]:
        """Keys to subscribe and to unsubscribe so the server holds ``wanted``;
        recorded as sent. Send the subscribes first: a key that takes over from
        another is then held before the other goes, so nothing falls between."""
        add = sorted(self.wanted - self._told)
        drop = sorted(self._told - self.wanted)
        self._told = set(self.wanted)
        for key in drop:
            self._unsubs[key] = self._unsubs.get(key, 0) + 1
        return add, drop

    def reset(self) -> None:
        """A new connection: the server holds nothing and was told nothing."""
        self._held.clear()
        self._held_globs.clear()
        self._told.clear()
        self._unsubs.clear()

    def confirmed(self, kind: bytes, name: bytes) -> Key | None:
        """Record a (p)(un)subscribe confirmation; the key when it subscribed."""
        if kind == b"subscribe" or kind == b"psubscribe":
            key = (SUB if kind == b"subscribe" else PAT, name)
            self._held.add(key)
            if key[0] == PAT:
                self._held_globs.add(name[:-1])
            return key
        key = (SUB if kind == b"unsubscribe" else PAT, name)
        self._held.discard(key)
        if key[0] == PAT:
            self._held_globs.discard(name[:-1])
        left = self._unsubs.get(key, 0) - 1
        if left > 0:
            self._unsubs[key] = left
        else:
            self._unsubs.pop(key, None)
        return None

    # -- questions ------------------------------------------------------------

    def live(self, key: Key) -> bool:
        """Does the server hold, for good, a key that delivers all of ``key``?"""
        if self._standing(key):
            return True
        name = key[1] if key[0] == SUB else key[1][:-1]
        for literal in self._literals(name):
            held = literal != name and literal in self._held_globs
            if held and self._standing((PAT, literal + b"*")):
                return True
        return False

    @staticmethod
    def covers(by: Key, key: Key) -> bool:
        """Is every channel of ``key`` also a channel of ``by``?"""
        return by == key or (by[0] == PAT and _under(key, by[1][:-1]))

    def deliver(self, via: Key, channel: bytes) -> bool:
        """Is ``via`` the one held key that delivers ``channel``? Each held key
        that matches sends its own copy; the shortest glob's copy counts."""
        if not self._held_globs:
            return True
        for literal in self._literals(channel):
            if literal in self._held_globs:
                return via == (PAT, literal + b"*")
        return via[0] == SUB

    def _standing(self, key: Key) -> bool:
        return key in self._held and key in self._told and key not in self._unsubs

    def _covered(self, key: Key, literals: set[bytes]) -> bool:
        """Is ``key`` covered by another glob among ``literals``?"""
        if not literals:
            return False
        name = key[1] if key[0] == SUB else key[1][:-1]
        return any(lit != name and lit in literals for lit in self._literals(name))

    def _literals(self, name: bytes) -> Iterator[bytes]:
        """Glob literals that could cover ``name``, shortest first: the prefix,
        then ``name`` up to each ``:`` after it."""
        prefix = self.prefix
        if not name.startswith(prefix):
            return
        yield prefix
        colon = name.find(b":", len(prefix))
        while colon != -1:
            yield name[: colon + 1]
            colon = name.find(b":", colon + 1)


def _under(key: Key, literal: bytes) -> bool:
    """Is ``key`` strictly inside the glob ``literal + "*"``?"""
    name = key[1] if key[0] == SUB else key[1][:-1]
    return name != literal and name.startswith(literal)


S = TypeVar("S", bound=Hashable)


@dataclass(slots=True)
class Wait:
    """Why a subscription is not live: entering, or down since a drop."""

    key: Key
    entered: asyncio.Future[None] | None  # completes when its ``__aenter__`` may return
    down_since: float | None = None  # monotonic time the connection dropped


class Waiting(Generic[S]):
    """Subscriptions that are not live, by key (a confirmation of a key only
    concerns the subscriptions it covers); ``down`` counts the dropped ones."""

    def __init__(self) -> None:
        self._waits: dict[S, Wait] = {}
        self._by_key: dict[Key, set[S]] = {}
        self.down = 0

    def __bool__(self) -> bool:
        return bool(self._waits)

    def __contains__(self, sub: S) -> bool:
        return sub in self._waits

    def add(self, sub: S, wait: Wait) -> None:
        """``sub`` waits for ``wait.key``."""
        self._waits[sub] = wait
        self._by_key.setdefault(wait.key, set()).add(sub)
        if wait.down_since is not None:
            self.down += 1

    def pop(self, sub: S) -> Wait | None:
        """``sub`` no longer waits (live, or gone); its wait."""
        wait = self._waits.pop(sub, None)
        if wait is None:
            return None
        subs = self._by_key.get(wait.key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_key[wait.key]
        if wait.down_since is not None:
            self.down -= 1
        return wait

    def covered_by(self, key: Key) -> list[tuple[S, Wait]]:
        """The waiting subscriptions whose key ``key`` covers."""
        if key[0] == SUB:
            found = list(self._by_key.get(key, ()))
        else:
            found = [
                s for k, subs in self._by_key.items() if ChannelPlan.covers(key, k) for s in subs
            ]
        return [(sub, self._waits[sub]) for sub in found]

    def entering(self) -> list[Wait]:
        """Waits of subscriptions whose ``__aenter__`` has not returned."""
        return [w for w in self._waits.values() if w.entered is not None and not w.entered.done()]

    def clear(self) -> dict[S, Wait]:
        """Forget everyone; what was waiting."""
        waits, self._waits = self._waits, {}
        self._by_key.clear()
        self.down = 0
        return waits


_NAMES_PER_COMMAND = 1000


def commands(add: list[Key], drop: list[Key]) -> list[tuple[bytes, ...]]:
    """The (P)(UN)SUBSCRIBE commands for :meth:`ChannelPlan.changes`, in that
    order (subscribes first), at most 1000 names each."""
    out: list[tuple[bytes, ...]] = []
    for verb, kind, keys in (
        (b"SUBSCRIBE", SUB, add),
        (b"PSUBSCRIBE", PAT, add),
        (b"UNSUBSCRIBE", SUB, drop),
        (b"PUNSUBSCRIBE", PAT, drop),
    ):
        names = [name for k, name in keys if k == kind]
        for i in range(0, len(names), _NAMES_PER_COMMAND):
            out.append((verb, *names[i : i + _NAMES_PER_COMMAND]))
    return out
