"""Foreign messages on both Honker transports, with honker's own Python API as the
raw client: rows written by ``db.stream(name).publish`` and ``tx.notify`` are
adopted as events (topic, id, payload, headers by the documented rule), a named
durable consumer never moves its position past a foreign row it neither
delivered nor dead-lettered, honker's own ``stream.subscribe()`` reads rows
alkpubsub wrote, consumer names of the two libraries never collide, and
CloudEvents written or read by the CNCF SDK round-trip through the rows."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cloudevents.v1.conversion import to_structured
from cloudevents.v1.http import CloudEvent, from_http

import alkpubsub
from alkpubsub import ConfigError, Event
from alkpubsub.conformance import collect, collect_acking, nothing_more
from alkpubsub.transports.honker import HonkerTransport
from alkpubsub.transports.honker_durable import HonkerDurableTransport

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def honker_child(path: str, code: str) -> Any:
    """Run ``code`` with honker's own API in another process (``db`` is open on
    ``path``); return the JSON it prints last."""
    script = f"import honker, json, sys\ndb = honker.open(sys.argv[1])\n{code}\n"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, path, stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(child.communicate(), 30)
    assert child.returncode == 0
    lines = out.decode().strip().splitlines()
    return json.loads(lines[-1]) if lines else None


async def durable(tmp_path: Path, query: str = "") -> HonkerDurableTransport:
    transport = await alkpubsub.connect(f"honker+durable://{tmp_path}/events.db{query}")
    assert isinstance(transport, HonkerDurableTransport)
    return transport


# -- honker+durable:// ----------------------------------------------------------


async def test_stream_rows_from_honkers_own_publish_are_adopted(tmp_path: Path) -> None:
    transport = await durable(tmp_path)
    path = transport.store.path
    async with transport.subscribe("events", start="earliest") as sub:
        await honker_child(
            path,
            "s = db.stream('events')\n"
            "s.publish({'order': 7}, key='o-7')\n"
            "s.publish('plain words')\n"
            "print('{}')",
        )
        with transport.store.transaction() as tx:  # and through store.honker, in-process
            transport.store.honker.stream("events").publish([1, 2], tx=tx.honker)
        got = await collect(sub, 3)
    rows = transport.store.rows_after("events", 0, 10)
    assert [e.payload for e in got] == [{"order": 7}, "plain words", [1, 2]]
    assert [e.topic for e in got] == ["events"] * 3  # foreign_topic defaults to the stream
    assert [e.headers for e in got] == [{"x-alk-foreign": "json"}] * 3
    assert {e.origin for e in got} == {"foreign"}
    assert got[0].key == "o-7"
    assert [e.offset for e in got] == [row["offset"] for row in rows]
    assert got[0].published_at == datetime.fromtimestamp(rows[0]["created_at"], UTC)
    # Ids are derived from the row's place, so every reading of it gives the same one.
    async with transport.subscribe("events", start="earliest") as again:
        assert [e.id for e in await collect(again, 3)] == [e.id for e in got]
    assert len({e.id for e in got}) == 3 and all(uuid.UUID(e.id).version == 5 for e in got)
    await transport.close()


async def test_foreign_text_that_is_not_json_is_adopted_as_text(tmp_path: Path) -> None:
    transport = await durable(tmp_path, "?foreign_topic=legacy:feed")
    path = transport.store.path
    async with transport.subscribe("legacy:*", start="earliest") as sub:
        sql = "INSERT INTO _honker_stream (topic, payload) VALUES ('events', 'hello {world')"
        await honker_child(path, f"with db.transaction() as tx:\n    tx.execute({sql!r})")
        [got] = await collect(sub, 1)
    assert (got.topic, got.payload, got.headers) == (
        "legacy:feed",
        "hello {world",
        {"x-alk-foreign": "text"},
    )
    await transport.close()


async def test_named_consumer_loses_and_skips_no_foreign_row_across_a_restart(
    tmp_path: Path,
) -> None:
    # Foreign rows interleaved with ours; the consumer acks what it gets, stops
    # after a foreign row it was given but had not acked, restarts: everything
    # arrives, in order, and only that unacked row comes twice.
    transport = await durable(tmp_path)
    path = transport.store.path
    ours = []
    for i in range(3):
        ours.append(await transport.publish("orders:created", {"ours": i}))
        await honker_child(path, f"db.stream('events').publish({{'theirs': {i}}})")
    async with transport.subscribe(">", consumer="worker", start="earliest") as sub:
        first = await collect_acking(sub, 3)
        [held] = await collect(sub, 1)  # the second foreign row, delivered, not acked
    assert held.payload == {"theirs": 1}
    await transport.close()
    restarted = await durable(tmp_path)
    async with restarted.subscribe(">", consumer="worker") as sub:
        rest = await collect_acking(sub, 3)
        await nothing_more(sub)
    payloads = [e.payload for e in first + rest]
    assert payloads == [
        {"ours": 0},
        {"theirs": 0},
        {"ours": 1},
        {"theirs": 1},
        {"ours": 2},
        {"theirs": 2},
    ]
    assert rest[0].id == held.id  # the same id on redelivery
    assert restarted.store.consumer_offsets() == {"worker": rest[-1].offset}
    await restarted.close()


@pytest.mark.parametrize("mode", ["dead_letter", "drop"])
async def test_foreign_rows_can_be_dead_lettered_or_dropped(tmp_path: Path, mode: str) -> None:
    transport = await durable(tmp_path, f"?foreign={mode}")
    path = transport.store.path
    async with (
        transport.subscribe("events", consumer="worker") as sub,
        transport.subscribe("dead:>", consumer="ops", start="earliest") as dead,
    ):
        await honker_child(path, "db.stream('events').publish({'theirs': 1})")
        mine = await transport.publish("events", "ours")
        [got] = await collect_acking(sub, 1)
        assert got.id == mine.id
        assert sub.stats.malformed == 1
        if mode == "dead_letter":
            [letter] = await collect_acking(dead, 1)
            assert letter.topic == "dead:events"
            assert letter.payload == '{"theirs": 1}'
            assert letter.headers["x-dead-kind"] == "malformed"
            assert letter.headers["x-consumer"] == "worker"
            assert sub.stats.dead_lettered == 1
        else:
            await nothing_more(dead)
            assert sub.stats.dead_lettered == 0
    await transport.close()


async def test_honkers_own_subscribe_reads_the_rows_we_write(tmp_path: Path) -> None:
    transport = await durable(tmp_path)
    sent = [await transport.publish("orders:created", {"n": i}, key=f"k{i}") for i in range(2)]
    code = (
        "import asyncio\n"
        "async def main():\n"
        "    it = db.stream('events').subscribe(from_offset=0)\n"
        "    got = [await asyncio.wait_for(it.__anext__(), 10) for _ in range(2)]\n"
        "    print(json.dumps([[e.offset, e.key, e.payload] for e in got]))\n"
        "asyncio.run(main())"
    )
    got = await honker_child(transport.store.path, code)
    # honker decodes the row's JSON text: the payload it hands out is our envelope.
    assert [(offset, key) for offset, key, _ in got] == [(e.offset, e.key) for e in sent]
    for (_, _, envelope), event in zip(got, sent, strict=True):
        assert Event.model_validate(envelope).id == event.id
        assert envelope["alkpubsub"] == 1 and envelope["payload"] == event.payload
    await transport.close()


# -- consumer names of the two libraries ------------------------------------------


async def test_consumer_names_of_honker_and_alkpubsub_never_collide(tmp_path: Path) -> None:
    transport = await durable(tmp_path)
    path = transport.store.path
    events = [await transport.publish("jobs:x", i) for i in range(4)]
    async with transport.subscribe("jobs:x", consumer="worker", start="earliest") as sub:
        await collect_acking(sub, 2)
    # honker's own consumer "worker" reads everything and saves far ahead ...
    await honker_child(
        path,
        f"s = db.stream('events')\ns.save_offset('worker', {events[-1].offset})\n"
        "print(s.get_offset('worker'))",
    )
    # ... which moves neither our saved position nor where we resume.
    assert transport.store.consumer_offsets() == {"worker": events[1].offset}
    async with transport.subscribe("jobs:x", consumer="worker") as sub:
        rest = await collect_acking(sub, 2)
    assert [e.id for e in rest] == [e.id for e in events[2:]]
    # And ours moving on did not move honker's (it saved further ahead, monotonic).
    theirs = await honker_child(path, "print(db.stream('events').get_offset('worker'))")
    assert theirs == events[-1].offset
    stats = {(s.consumer, s.kind): s.offset for s in await transport.consumer_stats()}
    assert stats == {("worker", "alkpubsub"): events[-1].offset, ("worker", "honker"): theirs}
    await transport.close()


# -- honker:// ------------------------------------------------------------------


async def test_notifications_from_honkers_tx_notify_are_adopted(tmp_path: Path) -> None:
    transport = await alkpubsub.connect(f"honker://{tmp_path}/events.db")
    assert isinstance(transport, HonkerTransport)
    async with transport.subscribe("orders:*") as sub:
        await honker_child(
            transport.store.path,
            "with db.transaction() as tx:\n"
            "    tx.notify('orders:created', {'order': 1})\n"
            "    tx.notify('orders:text', 'just text')\n",
        )
        with transport.store.honker.transaction() as tx:  # in-process, through store.honker
            tx.notify("orders:created", {"order": 2})
        got = await collect(sub, 3)
    assert [(e.topic, e.payload) for e in got] == [
        ("orders:created", {"order": 1}),
        ("orders:text", "just text"),  # honker wrote the JSON string '"just text"'
        ("orders:created", {"order": 2}),
    ]
    assert {e.headers["x-alk-foreign"] for e in got} == {"json"}
    assert {e.origin for e in got} == {"foreign"}
    assert len({e.id for e in got}) == 3
    await transport.close()


async def test_foreign_notifications_can_be_dropped(tmp_path: Path) -> None:
    transport = await alkpubsub.connect(f"honker://{tmp_path}/events.db?foreign=drop")
    async with transport.subscribe("orders:*") as sub:
        with transport.store.honker.transaction() as tx:
            tx.notify("orders:created", {"order": 1})
        mine = await transport.publish("orders:created", "ours")
        [got] = await collect(sub, 1)
    assert got.id == mine.id and sub.stats.malformed == 1
    await transport.close()


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("honker:///./e.db?foreign=keep", "foreign=adopt"),
        ("honker:///./e.db?foreign=dead_letter", "foreign=drop"),
        ("honker+durable:///./e.db?foreign=nope", "foreign=dead_letter"),
        ("honker:///./e.db?format=cloudevents-binary", "format=cloudevents"),
        ("honker+durable:///./e.db?format=cloudevents-binary", "format=cloudevents"),
        ("honker+durable:///./e.db?format=xml", "format=alkpubsub"),
        ("honker+durable:///./e.db?foreign_topic=a%20b", "foreign_topic"),
    ],
)
def test_bad_foreign_and_format_options_are_refused(url: str, named: str) -> None:
    scheme = url.partition(":")[0]
    module = "honker_durable" if scheme == "honker+durable" else "honker"
    from_url = __import__(f"alkpubsub.transports.{module}", fromlist=["from_url"]).from_url
    with pytest.raises(ConfigError, match=named):
        from_url(url)


# -- CloudEvents, checked with the CNCF SDK ---------------------------------------


@pytest.mark.parametrize("scheme", ["honker", "honker+durable"])
async def test_cloudevents_we_write_parse_in_the_sdk(tmp_path: Path, scheme: str) -> None:
    transport = await alkpubsub.connect(f"{scheme}://{tmp_path}/events.db?format=cloudevents")
    path = transport.store.path  # type: ignore[attr-defined]
    table, column = (
        ("_honker_stream", "payload")
        if scheme == "honker+durable"
        else ("_honker_notifications", "payload")
    )
    async with transport.subscribe("orders:*") as sub:
        sent = await transport.publish(
            "orders:created", {"n": 1}, headers={"traceparent": TRACEPARENT}
        )
        [back] = await collect(sub, 1)  # our own reader takes the format it wrote
    assert (back.id, back.payload, back.headers) == (sent.id, sent.payload, sent.headers)
    code = f"print(json.dumps(db.query('SELECT {column} FROM {table}')[-1]['{column}']))"
    text = await honker_child(path, code)
    event = from_http({"content-type": "application/cloudevents+json"}, text)
    assert event["id"] == sent.id
    assert event["type"] == "orders:created"
    assert event.data == {"n": 1}
    assert event["traceparent"] == TRACEPARENT
    parsed = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
    assert parsed == sent.published_at
    await transport.close()


async def test_an_sdk_cloudevent_written_raw_is_received(tmp_path: Path) -> None:
    ce = CloudEvent(
        {"type": "orders:created", "source": "/shop", "id": "ce-1", "traceparent": TRACEPARENT},
        {"n": 5},
    )
    _, body = to_structured(ce)
    live = await alkpubsub.connect(f"honker://{tmp_path}/events.db")
    log = await durable(tmp_path)
    async with live.subscribe("orders:*") as lsub, log.subscribe("orders:*") as dsub:
        await honker_child(
            log.store.path,
            f"text = {body.decode()!r}\n"
            "with db.transaction() as tx:\n"
            "    tx.execute('INSERT INTO _honker_notifications (channel, payload) "
            "VALUES (?, ?)', ['orders:created', text])\n"
            "db.stream('events').publish(json.loads(text))",
        )
        [a] = await collect(lsub, 1)
        [b] = await collect(dsub, 1)
    for got in (a, b):
        assert (got.topic, got.id, got.payload) == ("orders:created", "ce-1", {"n": 5})
        assert got.headers["traceparent"] == TRACEPARENT
        assert got.origin == "/shop"
    await live.close()
    await log.close()


async def test_a_position_saved_under_the_bare_name_is_carried_over(tmp_path: Path) -> None:
    # Versions before the alkpubsub: prefix saved the consumer "worker" as "worker".
    transport = await durable(tmp_path)
    events = [await transport.publish("jobs:x", i) for i in range(3)]
    with transport.store.transaction() as tx:
        tx.query("SELECT honker_stream_save_offset('worker', 'events', ?)", [events[0].offset])
    async with transport.subscribe("jobs:x", consumer="worker") as sub:
        got = await collect_acking(sub, 2)
    assert [e.id for e in got] == [e.id for e in events[1:]]
    kinds = {(c.name, c.kind): c.offset for c in transport.store.consumers()}
    assert kinds == {
        ("worker", "alkpubsub"): events[2].offset,
        ("worker", "honker"): events[0].offset,  # the old row, untouched
    }
    await transport.close()
