"""Outbox relay throughput next to the broker's raw async publish, in one run.

10,000 events of ~100-byte payload are committed into a fresh Honker file with
``open_store(path).transaction()`` + ``tx.publish``; then the relay drains them
to ``nats+durable`` and ``redis+durable`` (throwaway servers from
tests/brokers.py), and the raw clients publish the same envelopes (JetStream
``js.publish_async`` with ``Nats-Msg-Id``; Redis pipelined ``XADD``). Prints
events/s of each and the ratio relay / raw.

    .venv/bin/python scripts/relay_throughput.py [--count 10000] [--rounds 3] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import nats  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from brokers import NatsServer, RedisServer  # noqa: E402

import alkpubsub  # noqa: E402
from alkpubsub.event import Event  # noqa: E402
from alkpubsub.storage import open_store  # noqa: E402
from alkpubsub.storage.outbox_relay import OutboxRelay  # noqa: E402

PAD = "x" * 80  # {"i": 1234, "pad": "xxx..."} is ~100 bytes of JSON


def fill(db: Path, count: int) -> list[Event]:
    store = open_store(db)
    events: list[Event] = []
    with store.transaction() as tx:
        for i in range(count):
            events.append(tx.publish(f"orders:{i % 10}", {"i": i, "pad": PAD}))
    store.close()
    return events


async def relay_rate(db: Path, target_url: str, count: int, consumer: str, batch: int) -> float:
    source = await alkpubsub.connect(f"honker+durable://{db}")
    target = await alkpubsub.connect(target_url)
    try:
        relay = OutboxRelay(source, target, consumer=consumer, batch=batch, stats_file=False)
        t0 = time.perf_counter()
        await relay.run(limit=count)
        elapsed = time.perf_counter() - t0
        assert relay.stats.forwarded == count, relay.stats
        return count / elapsed
    finally:
        await source.close()
        await target.close()


def envelopes(events: list[Event]) -> list[tuple[Event, bytes]]:
    return [(e, e.with_offset(None).model_dump_json(exclude_none=True).encode()) for e in events]


async def raw_nats(url: str, events: list[Event], stream: str) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{stream}.>"])
    items = envelopes(events)
    t0 = time.perf_counter()
    futures = []
    for e, body in items:
        subject = f"{stream}.{e.topic.replace(':', '.')}"
        futures.append(await js.publish_async(subject, body, headers={"Nats-Msg-Id": e.id}))
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - t0
    await nc.close()
    return len(items) / elapsed


async def raw_redis(url: str, events: list[Event], stream: str) -> float:
    client: Any = aioredis.from_url(url)
    items = envelopes(events)
    t0 = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for e, body in items:
        pipe.xadd(stream, {"topic": e.topic, "event": body})
    await pipe.execute()
    elapsed = time.perf_counter() - t0
    await client.aclose()
    return len(items) / elapsed


async def main(args: argparse.Namespace) -> None:
    count = args.count
    with (
        tempfile.TemporaryDirectory() as tmp,
        NatsServer(base_dir=Path(tmp) / "nats") as ns,
        RedisServer(base_dir=Path(tmp) / "redis") as rs,
    ):
        db = Path(tmp) / "app.db"
        events = fill(db, count)
        results: dict[str, list[float]] = {}
        profile = cProfile.Profile() if args.profile else None
        for r in range(args.rounds):
            nats_url = ns.url.replace("nats://", "nats+durable://") + f"?stream=RELAY{r}"
            redis_url = rs.url.replace("redis://", "redis+durable://") + f"?stream=relay{r}"
            for name, url in (("nats", nats_url), ("redis", redis_url)):
                if profile is not None:
                    profile.enable()
                # Each relay reads its own consumer from the start of the file; the
                # limit stops it after `count` events.
                rate = await relay_rate(db, url, count, f"bench-{name}-{r}", args.batch)
                if profile is not None:
                    profile.disable()
                if name == "nats":
                    raw_rate = await raw_nats(ns.url, events, f"RAW{r}")
                else:
                    raw_rate = await raw_redis(rs.url, events, f"raw{r}")
                results.setdefault(f"{name} relay", []).append(rate)
                results.setdefault(f"{name} raw", []).append(raw_rate)
                print(
                    f"round {r} {name}: relay {rate:,.0f}/s  raw {raw_rate:,.0f}/s  "
                    f"ratio {rate / raw_rate:.2f}",
                    flush=True,
                )
        for name in ("nats", "redis"):
            relay = sorted(results[f"{name} relay"])[len(results[f"{name} relay"]) // 2]
            raw = sorted(results[f"{name} raw"])[len(results[f"{name} raw"]) // 2]
            print(f"{name}: median relay {relay:,.0f}/s  raw {raw:,.0f}/s  ratio {relay / raw:.2f}")
        if profile is not None:
            pstats.Stats(profile).sort_stats("cumulative").print_stats(35)
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--profile", action="store_true")
    asyncio.run(main(parser.parse_args()))
