"""Dedupe by event id for events the Redis transports *forward* (the outbox
relay, a composite leg): an id forwarded again within ``dedupe_window``
seconds reaches the stream or channel once, across relay crashes, restarts
and concurrent relays.

Each forwarded event runs one Lua script (EVALSHA, the whole batch pipelined
in one round trip, in order) that checks and sets the dedupe key and only if
the key was new writes the event (XADD or PUBLISH), then sets the key with
``PX <window>``. A script runs atomically, so no crash can leave a key
without its entry or an entry without its key. The script is loaded on first
use and again after a ``NOSCRIPT`` reply (a restarted or flushed server).

Keys (in the transport's database; they expire with the window):

* ``redis+durable://``: ``alkpubsub:dedupe:{<stream>}:<event id>``, holding
  the entry id, so a duplicate reports the original entry's offset. The
  ``{<stream>}`` hash tag would put the key in the stream's cluster slot, but
  Redis Cluster is not supported yet.
* ``redis://``: ``alkpubsub:dedupe:<channel>:<event id>`` (``<channel>`` =
  ``prefix`` + topic), holding ``1``. Keys are per database while channels
  are global to the server: publishers that forward the same ids to one
  channel must use the same database.

Memory: one key per event forwarded within the window, ~150 bytes each
(``MEMORY USAGE`` with a 36-character id: 104 bytes on ``redis://``, 136 on
``redis+durable://``, plus its expiry entry), so 1,000 events/s with the
default 120 s window hold ~18 MB. A server that evicts
keys (``maxmemory-policy`` ``allkeys-*`` or ``volatile-*``) may drop dedupe
keys early: then a re-forwarded event is stored again.

Plain ``publish()`` and ``publish_many()`` (fresh ids) never run the script.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rex

from alkpubsub.abilities import BatchForwarding
from alkpubsub.errors import PublishError
from alkpubsub.event import Event

from ._redis_common import CONNECTION_ERRORS, RedisTarget, id_to_offset, translate

KEY_PREFIX = b"alkpubsub:dedupe:"
"""First part of every dedupe key (see the module docstring)."""

MAX_WINDOW = 30 * 86_400.0
"""Largest ``dedupe_window`` in seconds (30 days)."""

# KEYS[1] stream, KEYS[2] dedupe key; ARGV[1] window in ms, ARGV[2..] the XADD
# arguments after the key (trim, "*", fields). XADD runs before SET: a script
# is not rolled back, so a failed XADD must leave no key behind.
XADD_SCRIPT = b"""\
local seen = redis.call('GET', KEYS[2])
if seen then return {0, seen} end
local id = redis.call('XADD', KEYS[1], unpack(ARGV, 2))
redis.call('SET', KEYS[2], id, 'PX', ARGV[1])
return {1, id}
"""

# KEYS[1] dedupe key; ARGV[1] window in ms, ARGV[2] channel, ARGV[3] message.
PUBLISH_SCRIPT = b"""\
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""


def entry_offset(entry_id: bytes) -> int | None:
    """The offset of the entry id a dedupe key holds (None if it holds none)."""
    return id_to_offset(entry_id) if b"-" in entry_id else None


async def forward_one(transport: BatchForwarding, event: Event) -> Event:
    """``forward()`` through ``forward_many()``: the same checks and dedupe for
    one event; a refused event raises its error."""
    (done,) = await transport.forward_many([event])
    if done.refused is not None:
        raise done.refused
    return done.event


class DedupeScript:
    """One dedupe script of one transport: runs it for a batch, pipelined.

    ``window`` is the dedupe window in seconds (> 0); ``scope`` is what the
    keys are namespaced by (``{<stream>}:``, or nothing when the channel is
    part of each key)."""

    def __init__(self, source: bytes, target: RedisTarget, window: float, scope: bytes) -> None:
        self.source = source
        self.sha = hashlib.sha1(source).hexdigest().encode()
        self.target = target
        self.window_ms = b"%d" % max(1, round(window * 1000))
        """The ``PX`` argument: the window in ms, at least 1."""
        self.prefix = KEY_PREFIX + scope
        """Every dedupe key of this transport starts with it."""

    def key(self, event_id: str, scope: bytes = b"") -> bytes:
        """The dedupe key of ``event_id`` (``scope``: a channel, then ``:``)."""
        return self.prefix + scope + event_id.encode()

    async def run(
        self, client: aioredis.Redis, calls: Sequence[tuple[bytes, ...]], doing: str
    ) -> list[Any]:
        """Run the script once per ``calls`` item (``numkeys, *keys, *args``),
        in order, in one pipeline; return the replies. Items answered
        ``NOSCRIPT`` are run again once the script is loaded; any other error
        reply raises :class:`PublishError` (the batch may be forwarded again:
        what was stored is then reported duplicate)."""
        replies = await self._pipeline(client, calls, doing)
        missing = [i for i, r in enumerate(replies) if isinstance(r, rex.NoScriptError)]
        if missing:
            try:
                await client.execute_command(b"SCRIPT", b"LOAD", self.source)  # type: ignore[no-untyped-call]
            except CONNECTION_ERRORS as exc:
                raise translate(exc, self.target, doing) from None
            again = await self._pipeline(client, [calls[i] for i in missing], doing)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, rex.ResponseError):
                raise PublishError(
                    f"{self.target.label} refused {doing} ({reply}); other events of the "
                    "batch may be stored: forwarding it again stores each of them once"
                )
        return replies

    async def _pipeline(
        self, client: aioredis.Redis, calls: Sequence[tuple[bytes, ...]], doing: str
    ) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        command, sha = pipe.execute_command, self.sha
        for call in calls:
            command(b"EVALSHA", sha, *call)
        try:
            return list(await pipe.execute(raise_on_error=False))
        except CONNECTION_ERRORS as exc:
            raise translate(exc, self.target, doing) from None
