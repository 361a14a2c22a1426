"""The hub and its ``ws://`` spokes beyond the conformance suite: hub restarts,
tenants, tokens, slow spokes, hostile frames, a composite with a hub leg.

Every hub runs in the test's event loop (``tests/hubs.py``); raw clients are
plain ``websockets`` connections speaking ``docs/hub-protocol.md``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hubs import HubServer
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

import alkpubsub
from alkpubsub import ConnectionLost, Event, PublishError, Subscription, Transport, Unauthorized
from alkpubsub.conformance import collect, nothing_more, unique
from alkpubsub.hub import protocol as p
from alkpubsub.transports.ws import from_url

pytestmark = pytest.mark.timeout(90)


@pytest_asyncio.fixture
async def durable_hub(tmp_path: Path) -> AsyncIterator[HubServer]:
    async with HubServer(f"honker+durable://{tmp_path}/hub?tenant={{tenant}}") as hs:
        yield hs


@pytest_asyncio.fixture
async def spokes() -> AsyncIterator[list[Transport]]:
    """Transports to close at teardown."""
    made: list[Transport] = []
    yield made
    for transport in reversed(made):
        await asyncio.wait_for(transport.close(), 30)


async def spoke(made: list[Transport], url: str | list[str]) -> Transport:
    transport = await alkpubsub.connect(url)
    made.append(transport)
    return transport


async def raw_client(hs: HubServer, token: str) -> tuple[ClientConnection, dict[str, Any]]:
    """A plain WebSocket client of the hub, and the hub's welcome."""
    ws = await ws_connect(
        f"ws://127.0.0.1:{hs.port}/events",
        subprotocols=[p.SUBPROTOCOL],  # type: ignore[list-item]
        additional_headers={"Authorization": f"Bearer {token}"},
        max_size=None,
        compression=None,
    )
    welcome, _ = p.decode(await ws.recv(), p.HUB_OPS)
    assert welcome["op"] == "welcome"
    return ws, welcome


async def frame(ws: ClientConnection, timeout: float = 10) -> tuple[dict[str, Any], list[bytes]]:
    return p.decode(await asyncio.wait_for(ws.recv(), timeout), p.HUB_OPS)


async def wait_for(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)


# -- the hub restarts -------------------------------------------------------


async def forward_retrying(transport: Transport, event: Event, within: float = 30) -> Event:
    """Publish ``event`` (its id fixed), again after ConnectionLost, as the
    protocol says a careful publisher does."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await transport.forward(event)  # type: ignore[attr-defined,no-any-return]
        except (ConnectionLost, PublishError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_durable_spoke_resumes_after_two_hub_restarts(
    durable_hub: HubServer, spokes: list[Transport]
) -> None:
    hs = durable_hub
    url = hs.url(hs.token("acme"))
    publisher, consumer_side, live_side = [await spoke(spokes, url) for _ in range(3)]
    topic, consumer, total, buffer = unique("orders"), unique("c"), 2000, 100
    durable = consumer_side.subscribe(topic, consumer=consumer, buffer=buffer)
    live = live_side.subscribe(topic, buffer=total)
    await durable.start()
    await live.start()
    seen: Counter[str] = Counter()
    live_ids: set[str] = set()

    async def consume() -> None:
        async for event in durable:
            seen[event.id] += 1
            await durable.ack(event)

    async def watch() -> None:
        async for event in live:
            live_ids.add(event.id)

    tasks = [asyncio.create_task(consume()), asyncio.create_task(watch())]
    sent: list[str] = []

    async def publish() -> None:
        for i in range(total):
            event, _ = Event.create(topic, {"n": i}, origin="test")
            sent.append((await forward_retrying(publisher, event)).id)
            await asyncio.sleep(0.002)

    publishing = asyncio.create_task(publish())
    try:
        for mark in (total // 3, 2 * total // 3):
            await wait_for(lambda m=mark: len(sent) >= m, 30, f"{mark} events published")
            assert not publishing.done(), "publishing ended before the restart"
            await hs.restart(down=0.3)
        await asyncio.wait_for(publishing, 60)
        await wait_for(
            lambda: all(i in seen for i in sent),
            30,
            "every published event reached the durable consumer",
        )
        await wait_for(lambda: live.stats.reconnects >= 2, 10, "the live sub counted 2 reconnects")
        after = await publisher.publish(topic, "after")
        await wait_for(lambda: after.id in live_ids, 10, "the live sub delivers again")
    finally:
        for task in tasks:
            task.cancel()
    lost = len(set(sent) - set(seen))
    dup = sum(n - 1 for n in seen.values())
    print(
        f"WS restart: sent={len(sent)} lost={lost} dup={dup} "
        f"durable_reconnects={durable.stats.reconnects} live_reconnects={live.stats.reconnects} "
        f"live_missed={len(set(sent) - live_ids)} offline_ms={live.stats.offline_ms}"
    )
    assert lost == 0
    assert len(set(sent)) == total
    # At least once: per restart, at most what was delivered but not acked
    # (the spoke's buffer, its credit) and the acks in flight come again.
    assert dup <= 2 * 2 * buffer, f"{dup} duplicates for 2 restarts with buffer {buffer}"
    assert durable.stats.reconnects == 2
    assert live.stats.reconnects == 2
    assert live.stats.offline_ms > 0


async def test_a_durable_subscription_resumes_after_its_last_ack_across_a_restart(
    durable_hub: HubServer, spokes: list[Transport]
) -> None:
    hs = durable_hub
    url = hs.url(hs.token("acme"))
    publisher, consumer_side = [await spoke(spokes, url) for _ in range(2)]
    topic = unique("orders")
    async with consumer_side.subscribe(topic, consumer="worker", buffer=4) as sub:
        sent = [await publisher.publish(topic, i) for i in range(10)]
        for event in await collect(sub, 6):
            await sub.ack(event)
        await asyncio.sleep(0.3)  # the acks reached the hub (acks in flight may be lost)
        await hs.restart()
        rest = await collect(sub, 4, timeout=15)
        for event in rest:
            await sub.ack(event)
        await nothing_more(sub, 0.5)
        assert [e.id for e in rest] == [e.id for e in sent[6:]]
        assert sub.stats.reconnects == 1
        assert sub.stats.offline_ms > 0


# -- tenants -------------------------------------------------------------------


async def test_tenants_are_isolated(
    durable_hub: HubServer, spokes: list[Transport], tmp_path: Path
) -> None:
    hs = durable_hub
    a = await spoke(spokes, hs.url(hs.token("tenanta")))
    b = await spoke(spokes, hs.url(hs.token("tenantb")))
    assert (a.tenant, b.tenant) == ("tenanta", "tenantb")  # type: ignore[attr-defined]
    topic = unique("orders")
    async with (
        b.subscribe(">") as b_all,
        b.subscribe(topic, consumer="worker", start="earliest") as b_worker,
        a.subscribe(topic, consumer="worker", start="earliest") as a_worker,
    ):
        # The same consumer name in both tenants: no ConsumerBusy, separate positions.
        sent = [await a.publish(topic, i) for i in range(20)]
        got = await collect(a_worker, 20)
        assert [e.id for e in got] == [e.id for e in sent]
        await nothing_more(b_all, 0.5)
        await nothing_more(b_worker, 0.2)
        mine = await b.publish(topic, "b's own")
        [b_got] = await collect(b_worker, 1)
        assert b_got.id == mine.id
        [b_seen] = await collect(b_all, 1)
        assert b_seen.id == mine.id
        await nothing_more(a_worker, 0.3)
    # Each tenant has its own store file under the hub's root.
    assert {f.name for f in (tmp_path / "hub").glob("tenant-*.db")} == {
        "tenant-tenanta.db",
        "tenant-tenantb.db",
    }


# -- tokens --------------------------------------------------------------------


async def test_a_bad_token_is_refused_at_connect_without_showing_it(
    durable_hub: HubServer,
) -> None:
    hs = durable_hub
    hs.token("acme")  # the hub knows some token; not this one
    secret = "not-a-real-token-" + unique()
    url = hs.url(secret)
    with pytest.raises(Unauthorized) as caught:
        await alkpubsub.connect(url)
    message = str(caught.value)
    assert "the hub refused the connection (HTTP 403)" in message
    assert "token is not accepted" in message
    assert secret not in message
    assert secret not in repr(caught.value)
    transport = from_url(url)
    assert secret not in repr(transport)
    assert secret not in transport.name


async def test_a_grant_limits_publish_and_subscribe(
    durable_hub: HubServer, spokes: list[Transport]
) -> None:
    hs = durable_hub
    full = await spoke(spokes, hs.url(hs.token("acme")))
    limited = await spoke(
        spokes, hs.url(hs.token("acme", publish=("orders:>",), subscribe=("orders:*",)))
    )
    async with full.subscribe(">") as everything:
        with pytest.raises(Unauthorized, match="may not publish to 'billing:x'"):
            await limited.publish("billing:x", 1)
        with pytest.raises(Unauthorized):
            await limited.publish_many([("orders:a", 1), ("billing:x", 2)])
        await nothing_more(everything, 0.5)  # nothing of a refused frame was published
        ok = await limited.publish("orders:a", "fine")
        [got] = await collect(everything, 1)
        assert got.id == ok.id
    with pytest.raises(Unauthorized, match="may not subscribe"):
        async with limited.subscribe(">"):
            pass
    with pytest.raises(Unauthorized):
        async with limited.subscribe("orders:>"):  # wider than orders:*
            pass
    async with limited.subscribe("orders:a") as narrow:
        sent = await full.publish("orders:a", 2)
        [got] = await collect(narrow, 1)
        assert got.id == sent.id


async def test_a_hub_that_cannot_serve_now_is_not_taken_for_a_refused_token(
    spokes: list[Transport],
) -> None:
    # A tenant's transport that fails to open, or a hub shutting down, is HTTP
    # 503 (ConnectionLost: try again), not 403 (Unauthorized: give up).
    failures = [ConnectionLost("the store is down")]

    async def backend(tenant: str) -> Transport:
        if failures:
            raise failures.pop()
        return await alkpubsub.connect(f"memory://hub-{tenant}-{unique()}")

    async with HubServer(backend) as hs:
        url = hs.url(hs.token("acme"))
        with pytest.raises(ConnectionLost, match="HTTP 503"):
            await alkpubsub.connect(url)
        transport = await spoke(spokes, url)  # the store is back
        assert transport.tenant == "acme"  # type: ignore[attr-defined]
        assert hs.hub is not None
        await hs.hub.close()  # still listening, but closing
        with pytest.raises(ConnectionLost, match="HTTP 503"):
            await alkpubsub.connect(url)


# -- slow spokes ---------------------------------------------------------------


async def _time_to_receive(publisher: Transport, sub: Subscription, topic: str, n: int) -> float:
    started = time.monotonic()
    sending = asyncio.create_task(publisher.publish_many([(topic, i) for i in range(n)]))
    got = await collect(sub, n, timeout=30)
    await sending
    assert [e.payload for e in got] == list(range(n))
    return time.monotonic() - started


async def test_a_slow_spoke_does_not_slow_a_fast_one(spokes: list[Transport]) -> None:
    n, small = 5000, 10
    async with HubServer(f"memory://hub-{{tenant}}{unique()}") as hs:
        url = hs.url(hs.token("acme"))
        publisher, fast, slow = [await spoke(spokes, url) for _ in range(3)]
        topic = unique("feed")
        async with fast.subscribe(topic, buffer=n) as alone_sub:
            alone = await _time_to_receive(publisher, alone_sub, topic, n)
        async with (
            fast.subscribe(topic, buffer=n) as fast_sub,
            slow.subscribe(topic, buffer=small) as slow_sub,
        ):
            with_slow = await _time_to_receive(publisher, fast_sub, topic, n)
            # The slow spoke's transport reads its socket; its buffer keeps the
            # newest events and counts the rest as dropped, on the spoke's side.
            await wait_for(
                lambda: slow_sub.stats.dropped + slow_sub.buffered >= n,
                10,
                "every event reached the slow buffer or was counted dropped",
            )
            assert slow_sub.buffered == small
            assert slow_sub.stats.dropped == n - small
            assert hs.hub is not None
            for connection in hs.hub._connections:
                assert connection._out.qsize() <= hs.hub.send_queue
                for hub_sub in connection._subs.values():
                    assert hub_sub.sub.buffered <= hub_sub.sub.buffer_size
            kept = await collect(slow_sub, small)
            assert [e.payload for e in kept] == list(range(n - small, n))
        print(f"WS slow spoke: n={n} alone={alone:.3f}s with_slow={with_slow:.3f}s")
        assert with_slow <= alone * 3 + 1.0, (alone, with_slow)


async def test_a_spoke_that_stops_reading_its_socket_is_disconnected(
    spokes: list[Transport],
) -> None:
    slow_timeout = 0.5
    async with HubServer(
        f"memory://hub-{{tenant}}{unique()}", slow_timeout=slow_timeout, send_queue=8
    ) as hs:
        assert hs.hub is not None
        token = hs.token("acme")
        topic = unique("feed")
        stuck, _ = await raw_client(hs, token)
        # Credit for everything, then stop reading the socket.
        await stuck.send(p.encode(_subscribe(1, "a", topic) | {"credit": 10**6}))
        assert (await frame(stuck))[0]["op"] == "subscribed"
        stuck.transport.pause_reading()  # the client's own reader stops too
        publisher = await spoke(spokes, hs.url(token))
        other = await spoke(spokes, hs.url(token))
        async with other.subscribe(topic, buffer=1000) as other_sub:
            assert hs.hub.connections == 3
            received: list[str] = []

            async def drain() -> None:
                async for event in other_sub:
                    received.append(event.id)

            draining = asyncio.create_task(drain())
            payload = "x" * 100_000
            sent: list[Event] = []
            started = time.monotonic()
            # Well past slow_timeout, the other spokes still publish and receive.
            while time.monotonic() - started < slow_timeout * 4:
                sent += await publisher.publish_many([(topic, payload)] * 20)
            await wait_for(lambda: len(received) >= len(sent), 30, "the other spoke got all")
            draining.cancel()
            assert received == [e.id for e in sent]
            assert other_sub.stats.dropped == 0
            assert other_sub.stats.reconnects == 0
            # The stuck client reads again: it gets what was already on its way,
            # then the hub's close, 4408.
            stuck.transport.resume_reading()
            code = None
            try:
                async with asyncio.timeout(10):
                    while True:
                        await stuck.recv()
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
            await wait_for(lambda: hs.hub.connections == 2, 5, "the stuck connection is gone")
            later = await publisher.publish(topic, "later")
            [got_later] = await collect(other_sub, 1)
            assert got_later.id == later.id
        print(f"WS stuck spoke: {len(sent)} events of 100 kB published meanwhile, close {code}")
        assert code == p.CLOSE_TOO_SLOW


# -- hostile frames ------------------------------------------------------------


async def test_malformed_frames_get_errors_and_the_connection_goes_on(
    durable_hub: HubServer, spokes: list[Transport]
) -> None:
    hs = durable_hub
    token = hs.token("acme")
    topic = unique("feed")
    ws, welcome = await raw_client(hs, token)
    assert welcome["tenant"] == "acme"
    assert "consumer_offsets" in welcome["capabilities"]
    try:
        await ws.send(
            p.encode({"op": "subscribe", "id": 1, "sub": "a", "pattern": topic, "credit": 100})
        )
        header, _ = await frame(ws)
        assert header == {"op": "subscribed", "id": 1, "sub": "a"}
        publisher = await spoke(spokes, hs.url(token))
        event, body = Event.create(topic, 1, origin="raw")
        line = event.envelope(body)
        bad: list[tuple[str, str | bytes, str]] = [
            ("not JSON", "this is not json", "not JSON"),
            ("not an object", "[1, 2]", "not a JSON object"),
            ("unknown op", json.dumps({"op": "explode", "id": 2}), "unknown op"),
            ("missing fields", json.dumps({"op": "subscribe", "id": 3}), "without"),
            ("wrong type", json.dumps({"op": "credit", "sub": "a", "n": "lots"}), "wrong type"),
            ("header too big", json.dumps({"op": "ping", "pad": "x" * 20_000}), "header"),
            ("frame too big", b'{"op":"publish","id":4}\n' + b"x" * (5 * 1024 * 1024), "frame of"),
            (
                "300 events",
                p.encode({"op": "publish", "id": 5}, [line] * 300),
                "300 events in one frame",
            ),
            ("binary garbage", b"\xff\xfe\x00\x81garbage", "not JSON"),
            ("not an envelope", p.encode({"op": "publish", "id": 6}, [b"{}"]), "event 0"),
            ("no events", p.encode({"op": "publish", "id": 7}), "without events"),
            ("a duplicate sub id", p.encode(_subscribe(8, "a", topic)), "exists"),
        ]
        for what, data, message in bad:
            await ws.send(data)
            header, _ = await frame(ws)
            assert header["op"] == "error", what
            assert message in header["message"], (what, header)
            assert header["code"] in (p.BAD_FRAME, p.INVALID), (what, header)
        # A ping still answers; the valid subscription still receives.
        await ws.send(p.encode({"op": "ping", "id": 9}))
        assert (await frame(ws))[0] == {"op": "pong", "id": 9}
        sent = await publisher.publish(topic, "still here")
        header, lines = await frame(ws)
        assert header["op"] == "event" and header["sub"] == "a"
        assert p.read_event(lines[0]).id == sent.id
        # A valid raw publish is delivered too, to the spokes.
        async with publisher.subscribe(topic) as sub:
            await ws.send(p.encode({"op": "publish", "id": 10}, [line]))
            header, _ = await frame(ws)
            while header["op"] == "event":  # its own subscription sees it first
                header, _ = await frame(ws)
            assert header["op"] == "published" and header["id"] == 10
            [got] = await collect(sub, 1)
            assert got.id == event.id
    finally:
        await ws.close()


def _subscribe(request: int, sid: str, pattern: str) -> dict[str, Any]:
    return {"op": "subscribe", "id": request, "sub": sid, "pattern": pattern, "credit": 10}


# -- a composite with a hub leg --------------------------------------------------


async def test_composite_spoke_delivers_local_events_at_once_and_hub_events_once(
    durable_hub: HubServer, spokes: list[Transport], tmp_path: Path
) -> None:
    hs = durable_hub
    url = hs.url(hs.token("acme"))
    composite = await spoke(spokes, ["memory://", f"honker://{tmp_path}/local.db", url])
    remote = await spoke(spokes, url)
    topic = unique("feed")
    async with composite.subscribe(topic) as local_sub, remote.subscribe(topic) as remote_sub:
        # A local publish: delivered locally as soon as every target accepted it,
        # once (the echoes from the honker file and the hub are dropped), and it
        # reaches the hub's other spokes.
        started = time.monotonic()
        mine = await composite.publish(topic, "local")
        [got] = await collect(local_sub, 1)
        local_latency = time.monotonic() - started
        assert got.id == mine.id
        [far] = await collect(remote_sub, 1)
        assert far.id == mine.id
        # An event published by another spoke arrives once, through the hub.
        theirs = [await remote.publish(topic, i) for i in range(20)]
        got_theirs = await collect(local_sub, 20)
        assert [e.id for e in got_theirs] == [e.id for e in theirs]
        await collect(remote_sub, 20)
        await nothing_more(local_sub, 0.5)
        await nothing_more(remote_sub, 0.2)
    print(f"WS composite: local delivery {local_latency * 1000:.1f} ms")
    assert local_latency < 1.0
