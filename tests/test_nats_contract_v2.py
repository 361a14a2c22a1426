"""Contract v2 on both NATS transports, with a raw nats-py client on the other
end: dead letters at ``dead:<topic>`` (never seen by wildcards, never buried
twice), one topic per message, foreign messages adopted (``foreign=``), and
CloudEvents both ways against the CNCF SDK (``format=``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime

import nats
import pytest
from brokers import NatsServer
from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent, from_http
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats_garbage import envelope, settle_publisher, until_malformed

import alkpubsub
from alkpubsub import ConfigError, Event, Transport
from alkpubsub.conformance import collect, collect_acking, nothing_more, unique
from alkpubsub.registry import resolve
from alkpubsub.transports._nats_common import to_subject
from alkpubsub.transports.nats_durable import NatsDurableTransport

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def core_url(server: NatsServer, prefix: str, query: str = "") -> str:
    return f"{server.url}?prefix={prefix}" + (f"&{query}" if query else "")


def durable_url(server: NatsServer, stream: str, query: str = "") -> str:
    base = server.url.replace("nats://", "nats+durable://")
    return f"{base}?stream={stream}" + (f"&{query}" if query else "")


@pytest.fixture
async def raw(nats_server_session: NatsServer) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server_session.url)
    yield nc
    await nc.close()


@pytest.fixture(params=["core", "durable"])
async def pair(
    request: pytest.FixtureRequest, nats_server_session: NatsServer
) -> AsyncIterator[tuple[Transport, str]]:
    """A transport of each kind and the prefix of its subjects."""
    name = unique("S")
    if request.param == "core":
        url = core_url(nats_server_session, name)
    else:
        url = durable_url(nats_server_session, name)
    transport = await alkpubsub.connect(url)
    yield transport, name
    await transport.close()


async def raw_send(
    raw: Client, transport: Transport, subject: str, body: bytes, headers: dict[str, str] | None
) -> None:
    """Publish as another program would: JetStream publish on a durable
    transport's stream (stored before we return), plain publish on core."""
    if isinstance(transport, NatsDurableTransport):
        await raw.jetstream().publish(subject, body, headers=headers)
    else:
        await settle_publisher(raw)
        await raw.publish(subject, body, headers=headers)
        await raw.flush()


def consumer_for(transport: Transport) -> str | None:
    return unique("c") if isinstance(transport, NatsDurableTransport) else None


# -- one topic per message -------------------------------------------------------


async def test_topic_spoofing_is_refused(pair: tuple[Transport, str], raw: Client) -> None:
    transport, prefix = pair
    spoof = json.dumps(envelope("secret:payroll", payload={"salary": 1})).encode()
    async with transport.subscribe("graph:*", consumer=consumer_for(transport)) as sub:
        await raw_send(raw, transport, to_subject(prefix, "graph:created"), spoof, None)
        good = await transport.publish("graph:created", "ok")
        [got] = await collect(sub, 1)
        assert got.id == good.id and got.topic == "graph:created"
        await until_malformed(sub, 1)
        await nothing_more(sub)


async def test_a_cloudevent_naming_another_topic_is_refused(
    pair: tuple[Transport, str], raw: Client
) -> None:
    transport, prefix = pair
    ce = CloudEvent(
        {"type": "graph:created", "source": "/x", "id": "ce-1", "topic": "secret:payroll"}, {}
    )
    headers, body = to_binary(ce)
    async with transport.subscribe("graph:*", consumer=consumer_for(transport)) as sub:
        await raw_send(raw, transport, to_subject(prefix, "graph:created"), body, headers)
        await until_malformed(sub, 1)
        await nothing_more(sub)


# -- dead letters -------------------------------------------------------------------


async def _bury_one(transport: Transport, topic: str) -> Event:
    """Publish an event to ``topic`` and nack it until it is dead-lettered."""
    sent = await transport.publish(topic, {"poison": True})
    async with transport.subscribe(topic, consumer=unique("w"), start="earliest") as sub:
        for _ in range(transport.max_deliveries):  # type: ignore[attr-defined]
            [event] = await collect(sub, 1)
            await sub.nack(event, reason="boom")
        async with asyncio.timeout(10):
            while sub.stats.dead_lettered < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    return sent


async def test_wildcards_skip_dead_letters_on_both_transports(
    nats_server_session: NatsServer, raw: Client
) -> None:
    # A core transport whose prefix is the stream's name sees the stream's
    # subjects, dead letters (<stream>.dead.<topic>) included.
    stream = unique("S")
    # The publisher connects after both core subscriptions exist (see
    # test_a_foreign_message_is_adopted on nats-server 2.9.10).
    async with (
        await alkpubsub.connect(core_url(nats_server_session, stream)) as core,
        core.subscribe(">") as core_all,
        core.subscribe("dead:>") as core_dead,
        await alkpubsub.connect(durable_url(nats_server_session, stream)) as durable,
    ):
        sent = await _bury_one(durable, "jobs:x")
        [letter] = await collect(core_dead, 1)
        assert letter.topic == "dead:jobs:x"
        assert letter.headers["x-original-id"] == sent.id
        assert [e.id for e in await collect(core_all, 1)] == [sent.id]
        await nothing_more(core_all)
        assert core_all.stats.malformed == 0
        # A named consumer on '>' (filter '<stream>.>') is handed the dead letter
        # by the server; it acks it unseen, without counting it malformed.
        async with durable.subscribe(">", consumer="all", start="earliest") as every:
            got = await collect_acking(every, 1)
            assert [e.id for e in got] == [sent.id]
            await nothing_more(every)
            assert every.stats.malformed == 0
            async with asyncio.timeout(10):
                while True:
                    info = await raw.jetstream().consumer_info(stream, "all")
                    if info.num_pending == 0 and info.num_ack_pending == 0:
                        break
                    await asyncio.sleep(0.05)


async def test_a_dead_letter_carries_its_id_as_nats_msg_id(
    nats_server_session: NatsServer, raw: Client
) -> None:
    # A re-bury after a crash (same original, same consumer) is then dropped
    # by the server's duplicate window instead of stored twice.
    stream = unique("S")
    async with (
        await alkpubsub.connect(durable_url(nats_server_session, stream)) as durable,
        durable.subscribe("dead:>", consumer="ops") as dead,
    ):
        await _bury_one(durable, "jobs:x")
        [letter] = await collect_acking(dead, 1)
        assert letter.offset is not None
        stored = await raw.jetstream().get_msg(stream, letter.offset)
        assert stored.headers is not None
        assert stored.headers["Nats-Msg-Id"] == letter.id


async def test_a_dead_letter_that_keeps_failing_is_redelivered_not_buried_again(
    nats_server_session: NatsServer, raw: Client
) -> None:
    stream = unique("S")
    url = durable_url(nats_server_session, stream, "max_deliveries=2")
    async with await alkpubsub.connect(url) as durable:
        await _bury_one(durable, "jobs:x")
        async with durable.subscribe("dead:>", consumer="ops", start="earliest") as dead:
            info = await raw.jetstream().consumer_info(stream, "ops")
            assert info.config.max_deliver == -1  # the server never gives up on it
            ids = set()
            for _ in range(5):  # well past max_deliveries=2
                [letter] = await collect(dead, 1)
                ids.add(letter.id)
                await dead.nack(letter, reason="still failing")
            [letter] = await collect(dead, 1)
            await dead.ack(letter)
            assert len(ids) == 1 and dead.stats.dead_lettered == 0
        assert (await raw.jetstream().stream_info(stream)).state.messages == 2


# -- foreign messages ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "payload", "kind"),
    [
        (b'{"order": 7, "items": ["a"]}', {"order": 7, "items": ["a"]}, "json"),
        (b"[1, 2]", [1, 2], "json"),
        (b"hello, world", "hello, world", "text"),
        (b'{"n": 1e999}', '{"n": 1e999}', "text"),  # JSON beyond the publish limits
    ],
)
async def test_a_foreign_message_is_adopted(
    pair: tuple[Transport, str], raw: Client, body: bytes, payload: object, kind: str
) -> None:
    transport, prefix = pair
    subject = to_subject(prefix, "shop:order")
    async with transport.subscribe("shop:*", consumer=consumer_for(transport)) as sub:
        await raw_send(raw, transport, subject, body, None)
        [got] = await collect(sub, 1)
        if sub.consumer is not None:
            await sub.ack(got)
    # Deterministic ids: the same message read again has the same id (core: the
    # same body on the same subject; JetStream: the same stream sequence). One
    # subscription at a time, and see settle_publisher: nats-server 2.9.10
    # sometimes drops a publish from another connection sent right after a SUB.
    if isinstance(transport, NatsDurableTransport):
        async with transport.subscribe("shop:order", start="earliest") as again:
            [same] = await collect(again, 1)
    else:
        async with transport.subscribe("shop:order") as again:
            await raw_send(raw, transport, subject, body, None)
            [same] = await collect(again, 1)
    assert got.topic == "shop:order"
    assert got.payload == payload
    assert got.headers == {"x-alk-foreign": kind}
    assert got.origin == "foreign"
    assert got.id == same.id
    assert sub.stats.malformed == 0


async def test_an_adopted_event_can_be_published_again_and_read_raw(
    pair: tuple[Transport, str], raw: Client
) -> None:
    # The other direction: what we adopted goes back out as our envelope.
    transport, prefix = pair
    inbox = await raw.subscribe(to_subject(prefix, "copy:order"))
    async with transport.subscribe("shop:order") as sub:
        await raw_send(raw, transport, to_subject(prefix, "shop:order"), b'{"n": 1}', None)
        [got] = await collect(sub, 1)
    sent = await transport.publish("copy:order", got.payload, headers=got.headers)
    msg = await inbox.next_msg(timeout=5)
    wire = json.loads(msg.data)
    assert wire["alkpubsub"] == 1 and wire["id"] == sent.id
    assert wire["payload"] == {"n": 1} and wire["headers"] == {"x-alk-foreign": "json"}


async def test_foreign_drop_counts_and_drops(nats_server_session: NatsServer, raw: Client) -> None:
    for url, durable in (
        (core_url(nats_server_session, unique("p"), "foreign=drop"), False),
        (durable_url(nats_server_session, unique("S"), "foreign=drop"), True),
    ):
        async with await alkpubsub.connect(url) as transport:
            prefix = transport.prefix  # type: ignore[attr-defined]
            consumer = "c" if durable else None
            async with transport.subscribe("shop:*", consumer=consumer) as sub:
                await raw_send(raw, transport, to_subject(prefix, "shop:order"), b"{}", None)
                good = await transport.publish("shop:order", 1)
                [got] = await collect_acking(sub, 1) if durable else await collect(sub, 1)
                assert got.id == good.id
                await until_malformed(sub, 1)


async def test_foreign_dead_letter_buries_on_named_consumers(
    nats_server_session: NatsServer, raw: Client
) -> None:
    stream = unique("S")
    url = durable_url(nats_server_session, stream, "foreign=dead_letter")
    async with (
        await alkpubsub.connect(url) as transport,
        transport.subscribe("dead:>", consumer="ops") as dead,
        transport.subscribe("shop:*", consumer="c") as sub,
    ):
        ack = await raw.jetstream().publish(f"{stream}.shop.order", b"plain text")
        good = await transport.publish("shop:order", 1)
        [got] = await collect_acking(sub, 1)
        assert got.id == good.id
        [letter] = await collect_acking(dead, 1)
        assert sub.stats.dead_lettered == 1
    assert letter.topic == "dead:shop:order"
    assert letter.payload == "plain text"
    assert letter.headers["x-original-offset"] == str(ack.seq)
    assert "foreign" in letter.headers["x-dead-reason"]


@pytest.mark.parametrize("scheme", ["nats", "nats+durable"])
@pytest.mark.parametrize(
    ("query", "option"), [("foreign=keep", "foreign"), ("format=xml", "format")]
)
def test_an_unknown_foreign_or_format_value_names_the_option(
    scheme: str, query: str, option: str
) -> None:
    with pytest.raises(ConfigError, match=option):
        resolve(scheme)(f"{scheme}://127.0.0.1:1?{query}", None)


async def test_a_named_consumer_keeps_a_foreign_message_across_a_restart(
    nats_server_session: NatsServer, raw: Client
) -> None:
    stream = unique("S")
    url = durable_url(nats_server_session, stream)
    await raw.jetstream().add_stream(name=stream, subjects=[f"{stream}.>"])
    await raw.jetstream().publish(f"{stream}.shop.order", b'{"from": "legacy"}')
    async with await alkpubsub.connect(url) as transport:
        async with transport.subscribe("shop:*", consumer="c", start="earliest") as sub:
            [first] = await collect(sub, 1)  # handled, never acked: the consumer stops
        assert first.payload == {"from": "legacy"}
    async with await alkpubsub.connect(url) as transport:
        async with transport.subscribe("shop:*", consumer="c") as sub:
            [again] = await collect(sub, 1)
            assert again.id == first.id and again.offset == first.offset
            assert again.payload == first.payload
            await sub.ack(again)
        async with transport.subscribe("shop:*", consumer="c") as sub:
            await nothing_more(sub)
    info = await raw.jetstream().consumer_info(stream, "c")
    assert info.num_pending == 0 and info.num_ack_pending == 0


# -- CloudEvents -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["cloudevents", "cloudevents-binary"])
@pytest.mark.parametrize("durable", [False, True])
async def test_what_we_publish_as_a_cloudevent_parses_in_the_sdk(
    nats_server_session: NatsServer, raw: Client, fmt: str, durable: bool
) -> None:
    name = unique("S")
    if durable:
        url = durable_url(nats_server_session, name, f"format={fmt}")
    else:
        url = core_url(nats_server_session, name, f"format={fmt}")
    got: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        await got.put(msg)

    await raw.subscribe(to_subject(name, "graph:created"), cb=on_msg)
    await raw.flush()
    async with await alkpubsub.connect(url) as transport:
        sent = await transport.publish(
            "graph:created", {"node": 7}, headers={"traceparent": TRACEPARENT}
        )
        msg = await asyncio.wait_for(got.get(), 5)
    headers = dict(msg.headers or {})
    if durable:
        assert headers.pop("Nats-Msg-Id") == sent.id  # deduplicated by id in every format
    if fmt == "cloudevents":
        assert not headers
        ce = from_http({"content-type": "application/cloudevents+json"}, msg.data)
    else:
        assert headers["ce-id"] == sent.id
        ce = from_http(headers, msg.data)
    assert ce["id"] == sent.id
    assert ce["type"] == "graph:created"
    assert ce["traceparent"] == TRACEPARENT
    assert ce.data == {"node": 7}
    assert datetime.fromisoformat(str(ce["time"]).replace("Z", "+00:00")) == sent.published_at


@pytest.mark.parametrize("mode", ["structured", "binary"])
async def test_an_sdk_cloudevent_sent_raw_is_received_as_an_event(
    pair: tuple[Transport, str], raw: Client, mode: str
) -> None:
    transport, prefix = pair
    ce = CloudEvent(
        {
            "type": "com.example.created",
            "source": "/legacy/app",
            "id": "ce-42",
            "traceparent": TRACEPARENT,
        },
        {"node": 7},
    )
    headers, body = to_structured(ce) if mode == "structured" else to_binary(ce)
    async with transport.subscribe("graph:*", consumer=consumer_for(transport)) as sub:
        await raw_send(raw, transport, to_subject(prefix, "graph:created"), body, headers)
        [got] = await collect(sub, 1)
        if sub.consumer is not None:
            await sub.ack(got)
    assert got.topic == "graph:created"  # the arrival topic
    assert got.id == "ce-42"
    assert got.payload == {"node": 7}
    assert got.headers["traceparent"] == TRACEPARENT
    assert got.origin == "/legacy/app"
    assert sub.stats.malformed == 0
