"""The Redis commands of one consumer-group member on one stream.

``redis_durable.py`` decides *when* (its reader, claimer and keeper tasks);
this module says *how*, in Redis terms:

* reading new entries: ``XREADGROUP ... >`` in batches;
* taking over due entries: ``XAUTOCLAIM`` with ``claim_idle`` as the minimum
  idle time, then one pipelined ``XPENDING`` per entry for its delivery count;
* keeping entries it holds: ``XCLAIM ... JUSTID`` to itself resets their idle
  time without counting a delivery;
* nack: ``XCLAIM ... IDLE (claim_idle - delay)`` makes an entry claimable
  exactly when due (Redis clamps a negative idle time to now, so a delay
  longer than ``claim_idle`` is kept locally until it is within reach);
* close: every owned entry moves to the parking member ``alk.released`` with an
  idle time that makes it claimable at once (``RETRYCOUNT`` gives back the
  delivery of entries the app never saw), then ``XGROUP DELCONSUMER``;
* dead letter: ``XADD`` of a ``dead:<topic>`` entry and ``XACK`` in one ``MULTI``.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rex

from alkpubsub.errors import ConfigError

PARKING = "alk.released"
"""The member that holds entries handed back on close until someone claims them."""
_HANDBACK_IDLE_MS = 86_400_000  # idle enough for any member's claim_idle
_CHUNK = 1000

Entry = tuple[bytes, dict[bytes, bytes], int]
"""A stream entry: id, fields, deliveries so far (including this one)."""


class GroupMember:
    """One member (``member``) of consumer group ``group`` on ``stream``."""

    def __init__(
        self,
        io: aioredis.Redis,
        stream: str,
        group: str,
        member: str,
        *,
        claim_ms: int,
        batch: int,
        trim: dict[str, Any],
    ) -> None:
        self.io = io
        self.stream = stream
        self.group = group
        self.member = member
        self.claim_ms = claim_ms
        self.batch = batch
        self.trim = trim

    async def join(self, first_id: str) -> None:
        """Create the group at ``first_id`` unless it exists (then it resumes)."""
        try:
            await self.io.xgroup_create(self.stream, self.group, id=first_id, mkstream=True)
        except rex.ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return
            raise ConfigError(
                f"cannot create consumer group {self.group!r} on {self.stream!r} ({exc}); "
                "is that key a stream? pick another stream= name"
            ) from None

    async def rejoin(self) -> None:
        """The group vanished (the server lost its data, or someone destroyed it):
        recreate it at the start, so what the stream still holds is read, not skipped."""
        await self.join("0")

    async def read(self, count: int, block_ms: int) -> list[Entry]:
        """New entries for this member, waiting up to ``block_ms`` for some."""
        reply: Any = await self.io.xreadgroup(
            self.group, self.member, {self.stream: ">"}, count=count, block=block_ms
        )
        if isinstance(reply, dict):  # RESP3
            reply = list(reply.items())
        return [(eid, fields, 1) for _, entries in reply or () for eid, fields in entries]

    async def claim(self, cursor: bytes | str) -> tuple[bytes | str, list[Entry]]:
        """Take entries idle for ``claim_ms`` or more, from ``cursor`` on."""
        reply = await self.io.xautoclaim(
            self.stream, self.group, self.member, self.claim_ms, cursor, count=self.batch
        )
        cursor, claimed = reply[0], [e for e in reply[1] if e[1] is not None]
        if not claimed:
            return cursor, []
        pipe = self.io.pipeline(transaction=False)
        for entry_id, _ in claimed:
            pipe.xpending_range(self.stream, self.group, entry_id, entry_id, 1, self.member)
        rows = await pipe.execute()
        counts = [int(r[0]["times_delivered"]) if r else 1 for r in rows]
        return cursor, [(eid, f, n) for (eid, f), n in zip(claimed, counts, strict=True)]

    async def ack(self, ids: list[bytes]) -> None:
        """XACK ``ids``."""
        for i in range(0, len(ids), _CHUNK):
            await self.io.xack(self.stream, self.group, *ids[i : i + _CHUNK])

    async def keep(self, ids: list[Any]) -> None:
        """Reset the idle time of ``ids`` (held by this member): nobody claims them."""
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            await self.io.xclaim(self.stream, self.group, self.member, 0, chunk, justid=True)

    async def release_after(self, entry_id: bytes, delay_ms: int) -> None:
        """Make ``entry_id`` claimable in ``delay_ms`` (at most ``claim_ms``)."""
        idle = max(0, self.claim_ms - delay_ms)
        await self.io.xclaim(
            self.stream, self.group, self.member, 0, [entry_id], idle=idle, justid=True
        )

    async def lag(self) -> int | None:
        """Entries in the stream the group has not read yet, when Redis knows."""
        try:
            groups = await self.io.xinfo_groups(self.stream)
        except rex.ResponseError:
            return None
        for group in groups:
            if group.get("name") in (self.group, self.group.encode()):
                lag = group.get("lag")
                return None if lag is None else int(lag)
        return None

    async def hand_back(self, seen: set[bytes], due_ms: dict[bytes, int]) -> None:
        """Give every entry this member owns to :data:`PARKING`: claimable at once,
        or after ``due_ms[id]`` for nacked ones. Entries not in ``seen`` (the app
        never got them) have their delivery given back."""
        pending = await self.io.xpending_range(
            self.stream, self.group, "-", "+", count=1_000_000, consumername=self.member
        )
        plan: dict[tuple[int, int], list[Any]] = {}
        for row in pending:
            eid: Any = row["message_id"]
            count = int(row["times_delivered"])
            if eid in due_ms:
                key = (count, max(0, self.claim_ms - due_ms[eid]))
            elif eid in seen:
                key = (count, _HANDBACK_IDLE_MS)
            else:
                key = (max(count - 1, 0), _HANDBACK_IDLE_MS)
            plan.setdefault(key, []).append(eid)
        pipe = self.io.pipeline(transaction=False)
        for (count, idle), ids in plan.items():
            pipe.xclaim(
                self.stream, self.group, PARKING, 0, ids, idle=idle, retrycount=count, justid=True
            )
        await pipe.execute()

    async def leave(self) -> None:
        """Remove this member from the group (after :meth:`hand_back`)."""
        await self.io.xgroup_delconsumer(self.stream, self.group, self.member)

    async def destroy(self) -> None:
        """Delete the whole group (a private, anonymous one)."""
        await self.io.xgroup_destroy(self.stream, self.group)

    async def bury(self, entry_id: bytes, dead_fields: tuple[bytes, ...]) -> None:
        """Add the entry ``dead_fields`` (field/value pairs) to the stream and
        ack ``entry_id``, atomically."""
        pipe = self.io.pipeline(transaction=True)
        pairs = dict(zip(dead_fields[::2], dead_fields[1::2], strict=True))
        pipe.xadd(self.stream, pairs, **self.trim)  # type: ignore[arg-type]
        pipe.xack(self.stream, self.group, entry_id)
        await pipe.execute()
