"""Forwarding deduplicates by event id on the brokers that can: the Redis
transports' ``dedupe_window`` (a Lua script per event, see
``transports/_redis_dedupe.py``) and JetStream's ``Nats-Msg-Id``.

What the broker holds is read with raw clients (XRANGE, a plain redis-py
subscriber, nats-py), never through the transport under test.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis
from brokers import NatsServer, RedisServer
from nats.js.api import StreamConfig

import alkpubsub
from alkpubsub import ConfigError, Event, PayloadError
from alkpubsub.abilities import BatchForwarding, Forwarded
from alkpubsub.conformance import collect, unique
from alkpubsub.transport import BaseTransport
from alkpubsub.transports import redis, redis_durable
from alkpubsub.transports._redis_common import id_to_offset
from alkpubsub.transports._redis_dedupe import PUBLISH_SCRIPT, DedupeScript

TOPIC = "orders:created"
KINDS = ["redis+durable", "redis", "nats+durable"]
REDIS_KINDS = ["redis+durable", "redis"]


def events(count: int, *, size: int = 0) -> list[Event]:
    """Events as a relay reads them: ids and a source offset of their own."""
    return [
        Event.create(TOPIC, {"n": i, "pad": "x" * size}, origin="source")[0].with_offset(100 + i)
        for i in range(count)
    ]


def entry_event(fields: list[bytes]) -> Event:
    """The event of a stream entry's field/value list."""
    return Event.from_json(dict(zip(fields[::2], fields[1::2], strict=True))[b"event"])


class Target:
    """A broker destination of one kind: opens transports on it and lists the
    event ids it holds (a stream's entries, or what a raw subscriber got)."""

    def __init__(self, kind: str, server: RedisServer | NatsServer) -> None:
        self.kind = kind
        self.server = server
        self.name = unique("S")  # stream name, or channel prefix
        self.got: list[str] = []
        self._pubsub: Any = None
        self._raw: Any = None

    def url(self, **options: Any) -> str:
        if self.kind == "redis":
            query = {"prefix": f"{self.name}:", **options}
            base = self.server.url
        else:
            query = {"stream": self.name, **options}
            scheme = self.kind.split("+")[0]
            base = self.server.url.replace(f"{scheme}://", f"{self.kind}://")
        return f"{base}?" + "&".join(f"{k}={v}" for k, v in query.items())

    async def open(self, **options: Any) -> BaseTransport:
        transport = await alkpubsub.connect(self.url(**options))
        assert isinstance(transport, BaseTransport)
        assert isinstance(transport, BatchForwarding)
        return transport

    async def start(self) -> None:
        """Subscribe a raw reader before anything is forwarded (pub/sub keeps nothing)."""
        if self.kind == "redis":
            self._raw = aioredis.from_url(self.server.url)
            self._pubsub = self._raw.pubsub()
            await self._pubsub.subscribe(f"{self.name}:{TOPIC}")
            confirmed = await self._pubsub.get_message(timeout=5)  # live from here on
            assert confirmed is not None and confirmed["type"] == "subscribe"
        elif self.kind == "nats+durable":
            self._raw = await nats.connect(self.server.url)

    async def ids(self) -> list[str]:
        """The ids the broker holds (pub/sub: received so far), in order."""
        if self.kind == "redis+durable":
            assert isinstance(self.server, RedisServer)
            rows = self.server.call("XRANGE", self.name, "-", "+")
            assert isinstance(rows, list)
            return [entry_event(fields).id for _, fields in rows]  # type: ignore[misc]
        if self.kind == "redis":
            while True:
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=0.3
                )
                if message is None:
                    return list(self.got)
                self.got.append(Event.from_json(message["data"]).id)
        js = self._raw.jetstream()
        state = (await js.stream_info(self.name)).state
        seqs = range(state.first_seq, state.last_seq + 1) if state.messages else range(0)
        return [(await js.get_msg(self.name, seq)).headers["Nats-Msg-Id"] for seq in seqs]

    async def count(self) -> int:
        """How many events the stream holds (durable kinds)."""
        if self.kind == "redis+durable":
            assert isinstance(self.server, RedisServer)
            length = self.server.call("XLEN", self.name)
            assert isinstance(length, int)
            return length
        info = await self._raw.jetstream().stream_info(self.name)
        return int(info.state.messages)

    async def close(self) -> None:
        if self.kind == "redis" and self._raw is not None:
            await self._pubsub.aclose()
            await self._raw.aclose()
        elif self._raw is not None:
            await self._raw.close()


@pytest.fixture(params=KINDS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    server_fixture = (
        "nats_server_session" if request.param.startswith("nats") else "redis_server_session"
    )
    t = Target(request.param, request.getfixturevalue(server_fixture))
    await t.start()
    yield t
    await t.close()


def ids_of(results: list[Forwarded]) -> list[str]:
    return [r.event.id for r in results]


# -- the same events twice -----------------------------------------------------


async def test_forwarding_a_batch_twice_stores_it_once(target: Target) -> None:
    batch = events(20)
    async with await target.open() as transport:
        first = await transport.forward_many(batch)
        again = await transport.forward_many(batch)
    assert ids_of(first) == ids_of(again) == [e.id for e in batch]
    assert [r.duplicate for r in first] == [False] * 20
    assert [r.duplicate for r in again] == [True] * 20
    assert all(r.refused is None for r in first + again)
    assert await target.ids() == [e.id for e in batch]
    if target.kind == "redis":
        assert {r.event.offset for r in first} == {None}  # the source's offset is dropped
    else:
        offsets = [r.event.offset for r in first]
        assert None not in offsets and offsets == sorted(offsets)  # type: ignore[type-var]
        # A duplicate reports where the original was stored.
        assert [r.event.offset for r in again] == offsets


async def test_single_forward_goes_through_the_same_dedupe(target: Target) -> None:
    [event] = events(1)
    async with await target.open() as transport:
        stored = await transport.forward(event)
        again = await transport.forward(event)
        [batch_again] = await transport.forward_many([event])
    assert batch_again.duplicate
    assert await target.ids() == [event.id]
    if target.kind != "redis":
        assert stored.offset is not None and again.offset == stored.offset


async def test_a_refused_event_in_the_middle_leaves_the_others_stored_in_order(
    target: Target,
) -> None:
    small = events(4)
    [big] = events(1, size=2000)
    batch = [small[0], small[1], big, small[2], small[3]]
    async with await target.open() as transport:
        transport.max_payload_bytes = 1000
        results = await transport.forward_many(batch)
        again = await transport.forward_many(batch)
    assert ids_of(results) == [e.id for e in batch]
    assert isinstance(results[2].refused, PayloadError)
    assert [r.refused is None for r in results] == [True, True, False, True, True]
    assert [r.duplicate for r in results] == [False] * 5
    assert [r.duplicate for r in again] == [True, True, False, True, True]
    assert isinstance(again[2].refused, PayloadError)
    assert await target.ids() == [e.id for e in small]


async def test_dedupe_survives_a_new_transport(target: Target) -> None:
    # What a relay killed after forwarding, before saving its position, does
    # on restart: a new connection forwards the same batch again.
    batch = events(10)
    transport = await target.open()
    await transport.forward_many(batch)
    await transport.close()
    async with await target.open() as transport:
        again = await transport.forward_many([*batch, *events(1)])
    assert [r.duplicate for r in again] == [True] * 10 + [False]
    assert await target.ids() == [*(e.id for e in batch), again[-1].event.id]


async def test_concurrent_forwarders_store_each_event_once(target: Target) -> None:
    batch = events(200)
    one, two = await target.open(), await target.open()
    try:
        a, b = await asyncio.gather(one.forward_many(batch), two.forward_many(batch))
    finally:
        await one.close()
        await two.close()
    assert await target.ids() == [e.id for e in batch]
    # Exactly one of the two stored each event.
    assert [x.duplicate != y.duplicate for x, y in zip(a, b, strict=True)] == [True] * 200


# -- the window ------------------------------------------------------------------


@pytest.mark.parametrize("target", REDIS_KINDS, indirect=True)
async def test_dedupe_window_0_forwards_without_dedupe(target: Target) -> None:
    batch = events(3)
    async with await target.open(dedupe_window=0) as transport:
        first = await transport.forward_many(batch)
        again = await transport.forward_many(batch)
        await transport.forward(batch[0])
    assert [r.duplicate for r in first + again] == [False] * 6
    assert await target.ids() == [e.id for e in batch * 2 + batch[:1]]


async def test_an_id_is_stored_again_once_its_window_passed(target: Target) -> None:
    batch = events(3)
    window = "duplicate_window" if target.kind == "nats+durable" else "dedupe_window"
    async with await target.open(**{window: 1}) as transport:
        await transport.forward_many(batch)
        assert [r.duplicate for r in await transport.forward_many(batch)] == [True] * 3
        await asyncio.sleep(1.2)
        again = await transport.forward_many(batch)
    assert [r.duplicate for r in again] == [False] * 3
    assert await target.ids() == [e.id for e in batch * 2]


# -- what the Redis dedupe leaves in Redis ----------------------------------------


def dedupe_keys(server: RedisServer, target: Target) -> list[bytes]:
    pattern = (
        f"alkpubsub:dedupe:{{{target.name}}}:*"
        if target.kind == "redis+durable"
        else f"alkpubsub:dedupe:{target.name}:*"
    )
    keys = server.call("KEYS", pattern)
    assert isinstance(keys, list)
    return keys  # type: ignore[return-value]


@pytest.mark.parametrize("target", REDIS_KINDS, indirect=True)
async def test_publish_sets_no_dedupe_key_and_forward_sets_one_per_event(
    redis_server_session: RedisServer, target: Target
) -> None:
    async with await target.open(dedupe_window=60) as transport:
        await transport.publish(TOPIC, 1)
        await transport.publish_many([(TOPIC, i) for i in range(5)])
        assert dedupe_keys(redis_server_session, target) == []
        forwarded = await transport.forward_many(events(3))
    keys = dedupe_keys(redis_server_session, target)
    assert len(keys) == 3
    first = forwarded[0].event
    if target.kind == "redis+durable":
        key = f"alkpubsub:dedupe:{{{target.name}}}:{first.id}"
        value = redis_server_session.call("GET", key)
        assert isinstance(value, bytes) and id_to_offset(value) == first.offset  # the entry id
    else:
        key = f"alkpubsub:dedupe:{target.name}:{TOPIC}:{first.id}"
        assert redis_server_session.call("GET", key) == b"1"
    ttl = redis_server_session.call("PTTL", key)
    assert isinstance(ttl, int) and 55_000 < ttl <= 60_000


@pytest.mark.parametrize("kind", REDIS_KINDS)
async def test_dedupe_survives_a_redis_restart_with_persistence(
    redis_server: RedisServer, kind: str
) -> None:
    # redis_server keeps an AOF and restart() stops it gracefully (fsynced);
    # the restarted server has no script cache, so this also takes NOSCRIPT.
    target = Target(kind, redis_server)
    batch = events(5)
    async with await target.open() as transport:
        await transport.forward_many(batch)
        redis_server.restart()
        await target.start()  # pub/sub: listen to what comes after the restart
        again = await transport.forward_many([*batch, *events(1)])
    assert [r.duplicate for r in again] == [True] * 5 + [False]
    if kind == "redis+durable":
        assert await target.ids() == [*(e.id for e in batch), again[-1].event.id]
    else:
        assert await target.ids() == [again[-1].event.id]
    await target.close()


async def test_nats_dedupe_survives_a_server_restart(nats_server: NatsServer) -> None:
    target = Target("nats+durable", nats_server)
    batch = events(5)
    async with await target.open() as transport:
        await transport.forward_many(batch)
        nats_server.restart()
        again = await transport.forward_many(batch)
    assert [r.duplicate for r in again] == [True] * 5
    await target.start()
    assert await target.ids() == [e.id for e in batch]
    await target.close()


@pytest.mark.parametrize("module", [redis, redis_durable])
@pytest.mark.parametrize("value", ["-1", "soon", "inf", "2592001"])
def test_bad_dedupe_window_is_refused_naming_the_option(module: Any, value: str) -> None:
    scheme = "redis+durable" if module is redis_durable else "redis"
    with pytest.raises(ConfigError, match="dedupe_window"):
        module.from_url(f"{scheme}://127.0.0.1:1/0?dedupe_window={value}")


# -- chunks and formats ------------------------------------------------------------


@pytest.mark.parametrize("target", REDIS_KINDS, indirect=True)
async def test_large_events_are_chunked_and_kept_in_order(target: Target) -> None:
    # One script call takes at most 64 events or 512 KiB: 300 KB events each
    # take a call of their own, small ones share one, all in one pipeline.
    small, large = events(70), events(3, size=300_000)
    batch = [*small[:10], large[0], large[1], *small[10:], large[2]]
    async with await target.open() as transport:
        first = await transport.forward_many(batch)
        again = await transport.forward_many(batch)
    assert ids_of(first) == [e.id for e in batch]
    assert [r.duplicate for r in first] == [False] * len(batch)
    assert [r.duplicate for r in again] == [True] * len(batch)
    assert await target.ids() == [e.id for e in batch]


@pytest.mark.parametrize("fmt", ["alkpubsub", "cloudevents", "cloudevents-binary"])
async def test_forwarded_entries_in_every_stream_format_are_read_back(
    redis_server_session: RedisServer, fmt: str
) -> None:
    target = Target("redis+durable", redis_server_session)
    batch = [e.with_headers(trace=f"t{i}") for i, e in enumerate(events(5))]
    async with await target.open(format=fmt) as transport:
        await transport.forward_many(batch)
        assert all(r.duplicate for r in await transport.forward_many(batch))
        async with transport.subscribe(">", start="earliest") as sub:
            got = await collect(sub, 5)
    assert redis_server_session.call("XLEN", target.name) == 5
    assert [(e.id, e.payload, e.headers) for e in got] == [
        (e.id, e.payload, e.headers) for e in batch
    ]


def test_script_calls_take_at_most_64_events_or_512_kib() -> None:
    target = redis.from_url("redis://127.0.0.1:1/0").target
    script = DedupeScript(PUBLISH_SCRIPT, target, 1.5, b"")
    small = [(b"k%d" % i, (b"ch", b"m")) for i in range(130)]
    big = (b"big", (b"ch", b"x" * 400_000))
    calls = script.calls([*small[:2], big, big, *small[2:]])
    # numkeys, keys..., window in ms, then each event's channel and message.
    # The second big event would pass 512 KiB: it starts the next call.
    counts = [int(call[0]) for call in calls]
    assert counts == [3, 64, 64, 1]
    assert all(call[1 + n] == b"1500" for call, n in zip(calls, counts, strict=True))
    assert [k for call, n in zip(calls, counts, strict=True) for k in call[1 : 1 + n]] == [
        key for key, _ in [*small[:2], big, big, *small[2:]]
    ]


# -- a forwarder killed mid-batch --------------------------------------------------

FORWARDER = """
import asyncio, json, sys
import alkpubsub
from alkpubsub import Event

async def main():
    events = [Event.model_validate(e) for e in json.load(open(sys.argv[2]))]
    transport = await alkpubsub.connect(sys.argv[1])
    print("ready", flush=True)
    while True:  # forward everything again and again, as a relay that never saves
        for start in range(0, len(events), 50):
            await transport.forward_many(events[start : start + 50])

asyncio.run(main())
"""


@pytest.mark.parametrize("target", ["redis+durable", "nats+durable"], indirect=True)
async def test_a_forwarder_killed_mid_batch_and_run_again_stores_each_event_once(
    target: Target, tmp_path: Path
) -> None:
    batch = events(5000)
    path = tmp_path / "events.json"
    path.write_text(json.dumps([e.model_dump(mode="json") for e in batch]))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FORWARDER, target.url(), str(path), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 30) == b"ready\n"
        async with asyncio.timeout(30):
            while await target.count() < 300:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
    finally:
        child.kill()  # SIGKILL, somewhere inside a batch
        await child.wait()
    killed_at = await target.count()
    assert killed_at < len(batch)  # killed during the first pass
    async with await target.open() as transport:
        results = [
            r for s in range(0, 5000, 500) for r in await transport.forward_many(batch[s : s + 500])
        ]
    assert await target.ids() == [e.id for e in batch]
    assert sum(r.duplicate for r in results) == killed_at


async def test_nats_refuses_only_the_event_its_stream_cannot_take(
    nats_server_session: NatsServer,
) -> None:
    # The payload fits max_payload_bytes, but a long id (in the envelope and in
    # Nats-Msg-Id) takes the message past the stream's max_msg_size: that one
    # event is refused, not the whole batch.
    target = Target("nats+durable", nats_server_session)
    await target.start()
    js = target._raw.jetstream()
    await js.add_stream(
        StreamConfig(name=target.name, subjects=[f"{target.name}.>"], max_msg_size=4096)
    )
    async with await target.open() as transport:
        limit = transport.max_payload_bytes
        assert limit < 4096
        others = events(2)
        long = Event.create(TOPIC, "x" * (limit - 2), origin="source")[0].model_copy(
            update={"id": "i" * 1500}
        )
        results = await transport.forward_many([others[0], long, others[1]])
    assert [r.refused is None for r in results] == [True, False, True]
    assert isinstance(results[1].refused, PayloadError)
    assert await target.ids() == [others[0].id, others[1].id]
    await target.close()
