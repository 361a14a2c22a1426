"""JetStream transport specifics: stream and consumer set-up, deduplication,
dead letters for timeouts and malformed messages, broker restarts. The shared
durable behaviour is in the conformance suite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from brokers import NatsServer
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats_garbage import send_raw, until_malformed, wait_stored, write_garbage

import alkpubsub
from alkpubsub import ConfigError
from alkpubsub.abilities import ConsumerStatsSource
from alkpubsub.conformance import collect, collect_acking, nothing_more, unique
from alkpubsub.transports.nats_durable import NatsDurableTransport, from_url


def durable_url(server: NatsServer, stream: str, query: str = "") -> str:
    base = server.url.replace("nats://", "nats+durable://")
    return f"{base}?stream={stream}" + (f"&{query}" if query else "")


@pytest.fixture
async def js(nats_server_session: NatsServer) -> AsyncIterator[JetStreamContext]:
    """A plain nats-py JetStream context, to look at the server's side."""
    nc = await nats.connect(nats_server_session.url)
    yield nc.jetstream()
    await nc.close()


async def durable(url: str) -> NatsDurableTransport:
    transport = await alkpubsub.connect(url)
    assert isinstance(transport, NatsDurableTransport)
    return transport


# -- stream and options ------------------------------------------------------


async def test_stream_is_created_with_the_given_options(
    nats_server_session: NatsServer, js: JetStreamContext
) -> None:
    stream = unique("S")
    query = "storage=memory&max_age=60&duplicate_window=5"
    async with await durable(durable_url(nats_server_session, stream, query)):
        info = await js.stream_info(stream)
    assert info.config.subjects == [f"{stream}.>"]
    assert info.config.storage == StorageType.MEMORY
    assert info.config.max_age == 60
    assert info.config.duplicate_window == 5


async def test_existing_stream_with_other_settings_is_bound(
    nats_server_session: NatsServer, js: JetStreamContext
) -> None:
    stream = unique("S")
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"], max_msgs=100))
    async with await durable(durable_url(nats_server_session, stream)) as transport:
        await transport.publish("a", 1)
    info = await js.stream_info(stream)
    assert info.config.max_msgs == 100  # left as its owner made it
    assert info.state.messages == 1


async def test_existing_stream_with_other_subjects_is_refused(
    nats_server_session: NatsServer, js: JetStreamContext
) -> None:
    stream = unique("S")
    await js.add_stream(StreamConfig(name=stream, subjects=["elsewhere.>"]))
    with pytest.raises(ConfigError, match="subjects="):
        await alkpubsub.connect(durable_url(nats_server_session, stream))


async def test_overlapping_subjects_are_refused(nats_server_session: NatsServer) -> None:
    first, second = unique("S"), unique("S")
    async with await durable(durable_url(nats_server_session, first)):
        with pytest.raises(ConfigError, match="overlap"):
            await alkpubsub.connect(durable_url(nats_server_session, second, f"subjects={first}.>"))


async def test_server_without_jetstream_is_a_config_error(tmp_path: Path) -> None:
    with (
        NatsServer(base_dir=tmp_path, jetstream=False) as server,
        pytest.raises(ConfigError, match="-js"),
    ):
        await alkpubsub.connect(durable_url(server, "S", "api_timeout=1"))


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("stream=a.b", "stream"),
        ("stream=S&subjects=S", "subjects"),
        ("stream=S&storage=disk", "storage"),
        ("stream=S&ack_wait=0", "ack_wait"),
        ("stream=S&max_deliveries=0", "max_deliveries"),
        ("stream=S&max_ack_pending=0", "max_ack_pending"),
        # A member holding half the consumer's limit or more could stall it.
        ("stream=S&prefetch=501&max_ack_pending=1000", "prefetch"),
    ],
)
def test_bad_options_are_refused(query: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        from_url(f"nats+durable://127.0.0.1:1?{query}")


# -- publishing ----------------------------------------------------------------


async def test_offsets_are_stream_sequences_and_a_forwarded_event_is_stored_once(
    nats_server_session: NatsServer, js: JetStreamContext
) -> None:
    stream = unique("S")
    async with await durable(durable_url(nats_server_session, stream)) as transport:
        events = await transport.publish_many([("a", i) for i in range(3)])
        assert [e.offset for e in events] == [1, 2, 3]
        # A retry of the same event (same id: Nats-Msg-Id) is dropped by the server.
        again = await transport.forward(events[0])
        assert again.offset == 1
    assert (await js.stream_info(stream)).state.messages == 3


async def test_topic_with_dots_travels_escaped(
    nats_server_session: NatsServer, js: JetStreamContext
) -> None:
    stream = unique("S")
    async with await durable(durable_url(nats_server_session, stream)) as transport:
        await transport.publish("v1.2:ready", 1)
    msg = await js.get_msg(stream, 1)
    assert msg.subject == f"{stream}.v1~2.ready"


# -- consumers -----------------------------------------------------------------


async def test_consumer_name_with_a_dot_becomes_a_jetstream_consumer(
    nats_server_session: NatsServer, js: JetStreamContext
) -> None:
    stream = unique("S")
    async with (
        await durable(durable_url(nats_server_session, stream)) as transport,
        transport.subscribe("jobs:*", consumer="billing.v2"),
    ):
        info = await js.consumer_info(stream, "billing~v2")
    assert info.config.filter_subject == f"{stream}.jobs.*"
    assert info.config.max_deliver == transport.max_deliveries + 1


async def test_one_consumer_name_follows_one_pattern(nats_server_session: NatsServer) -> None:
    async with await durable(durable_url(nats_server_session, unique("S"))) as transport:
        async with transport.subscribe("a:*", consumer="worker"):
            pass
        with pytest.raises(ConfigError, match="another consumer name"):
            async with transport.subscribe("b:*", consumer="worker"):
                pass


async def test_anonymous_subscription_leaves_no_consumer_behind(
    nats_server_session: NatsServer, js: JetStreamContext
) -> None:
    stream = unique("S")
    async with await durable(durable_url(nats_server_session, stream)) as transport:
        async with transport.subscribe("a") as sub:
            assert len(await js.consumers_info(stream)) == 1
            await transport.publish("a", 1)
            [got] = await collect(sub, 1)
            assert got.offset == 1
            await sub.ack(got)  # a no-op without a consumer name
        assert await js.consumers_info(stream) == []


# -- dead letters ----------------------------------------------------------------


async def test_event_never_acked_goes_to_dead_letter_after_ack_wait(
    nats_server_session: NatsServer,
) -> None:
    url = durable_url(nats_server_session, unique("S"), "ack_wait=0.3&max_deliveries=2")
    async with (
        await durable(url) as transport,
        transport.subscribe("dead:jobs", consumer="morgue") as dead,
        transport.subscribe("jobs", consumer="worker") as sub,
    ):
        poison = await transport.publish("jobs", {"n": 1})
        # Delivered twice, never acked: each time ack_wait (0.3 s) runs out.
        first, second = await collect(sub, 2)
        assert first.id == second.id == poison.id
        [buried] = await collect_acking(dead, 1)
        await nothing_more(sub)
        assert sub.stats.dead_lettered == 1
    assert buried.payload == {"n": 1}
    assert buried.headers["x-original-id"] == poison.id
    assert buried.headers["x-deliveries"] == "2"
    assert buried.headers["x-consumer"] == "worker"
    assert "ack_wait" in buried.headers["x-dead-reason"]


async def test_malformed_message_is_dead_lettered_with_its_raw_text(
    nats_server_session: NatsServer, js: JetStreamContext
) -> None:
    stream = unique("S")
    async with (
        await durable(durable_url(nats_server_session, stream)) as transport,
        transport.subscribe("dead:jobs", consumer="morgue") as dead,
        transport.subscribe("jobs", consumer="worker") as sub,
    ):
        ack = await js.publish(f"{stream}.jobs", b"\xffnot an envelope")
        good = await transport.publish("jobs", "fine")
        [got] = await collect_acking(sub, 1)
        assert got.id == good.id
        assert sub.stats.malformed == 1
        [buried] = await collect_acking(dead, 1)
    assert buried.topic == "dead:jobs"
    assert buried.payload == "\ufffdnot an envelope"
    assert "malformed" in buried.headers["x-dead-reason"]
    assert buried.headers["x-dead-kind"] == "malformed"
    assert buried.headers["x-original-topic"] == "jobs"
    assert buried.headers["x-original-offset"] == str(ack.seq)
    assert buried.headers["x-consumer"] == "worker"


async def test_garbage_never_blocks_a_named_consumer(
    nats_server_session: NatsServer, js: JetStreamContext
) -> None:
    # Before: a status line that is not UTF-8 ended nats-py's read loop, and
    # with it every PubAck (publish raised PublishError after 10 s).
    server, stream = nats_server_session, unique("S")
    async with (
        await durable(durable_url(server, stream)) as transport,
        transport.subscribe("jobs:*", consumer="worker") as sub,
    ):
        written = await write_garbage(server.url, server.port, f"{stream}.jobs.x", "jobs:x")
        # A subject that is not UTF-8 is not a topic either: buried at dead:unknown.
        await asyncio.to_thread(
            send_raw, server.port, [b"PUB %s.jobs.\xff 2\r\nhi\r\n" % stream.encode()]
        )
        await wait_stored(server.url, stream, written.total + 1)
        sent = [e.id for e in await transport.publish_many([("jobs:x", i) for i in range(3)])]
        got = await collect_acking(sub, written.foreign + 3)
        assert [e.id for e in got] == [e.id for e in got if e.origin == "foreign"] + sent
        assert len({e.id for e in got if e.origin == "foreign"}) == written.foreign
        await until_malformed(sub, written.malformed + 1)
        async with asyncio.timeout(10):  # and nothing is left unacked on the consumer
            while (await js.consumer_info(stream, "worker")).num_ack_pending:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        # Each with its raw text, on dead:jobs:x (and dead:unknown).
        assert sub.stats.dead_lettered == written.malformed + 1
    assert (await js.consumer_info(stream, "worker")).num_pending == 0


# -- broker restarts ---------------------------------------------------------------


async def test_publish_waits_out_a_broker_restart_without_duplicates(
    nats_server: NatsServer,
) -> None:
    stream = unique("S")
    async with await durable(durable_url(nats_server, stream)) as transport:
        async with transport.subscribe("a", consumer="c") as sub:
            await asyncio.to_thread(nats_server.stop)
            publishing = asyncio.create_task(transport.publish("a", "during"))
            await asyncio.sleep(0.5)  # the publish is waiting for a PubAck meanwhile
            await asyncio.to_thread(nats_server.start)
            sent = await publishing
            [got] = await collect_acking(sub, 1)
            assert got.id == sent.id
            await nothing_more(sub)
            assert sub.stats.reconnects == 1
        nc = await nats.connect(nats_server.url)
        assert (await nc.jetstream().stream_info(stream)).state.messages == 1
        await nc.close()


async def test_memory_stream_and_consumer_lost_in_a_restart_are_recreated(
    nats_server: NatsServer,
) -> None:
    url = durable_url(nats_server, unique("S"), "storage=memory")
    async with await durable(url) as transport, transport.subscribe("a", consumer="c") as sub:
        await transport.publish("a", "before")
        await collect_acking(sub, 1)
        await asyncio.to_thread(nats_server.restart)  # memory stream: all gone
        after = await transport.publish("a", "after")
        [got] = await collect_acking(sub, 1, timeout=20)
        assert got.id == after.id


async def test_gone_server_ends_durable_iterators_with_connection_lost(
    nats_server: NatsServer,
) -> None:
    url = durable_url(nats_server, unique("S"), "reconnect_timeout=0.5&publish_timeout=1")
    async with await durable(url) as transport:
        sub = transport.subscribe("a", consumer="c")
        await sub.start()
        await asyncio.to_thread(nats_server.kill)
        # No server for 0.5 s: the iterator raises instead of hanging, then ends.
        with pytest.raises(alkpubsub.ConnectionLost, match="connect a new transport"):
            await sub.get(timeout=10)
        with pytest.raises(StopAsyncIteration):
            await sub.get(timeout=1)
        with pytest.raises(alkpubsub.ConnectionLost):
            await transport.publish("a", 1)


async def test_consumer_stats_report_offset_and_lag(nats_server_session: NatsServer) -> None:
    # 5 events, 3 read and acked by "billing": it has delivered up to sequence
    # 3 and 2 are still waiting for it.
    transport = await alkpubsub.connect(durable_url(nats_server_session, unique("S").upper()))
    sub = transport.subscribe("orders:*", consumer="billing", start="earliest", buffer=3)
    async with sub:
        for i in range(5):
            await transport.publish(f"orders:{i}", i)
        await collect_acking(sub, 3)
        assert isinstance(transport, ConsumerStatsSource)
        stats = await transport.consumer_stats()
    await transport.close()
    [row] = stats
    assert row.consumer == "billing"
    assert row.offset >= 3
    assert row.lag is not None and row.lag + row.offset == 5
