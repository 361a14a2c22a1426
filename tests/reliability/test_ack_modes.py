"""Acks that mean saved: a honker+durable consumer that acks each event is
SIGKILLed three times during 10,000 events. Counted: events it had acked (its
ack had returned) that were delivered to it again after a restart. With
``ack=saved`` that must be zero; with the default ``ack=batched`` it is the acks
of the last moments before each kill (recorded, bounded loosely)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import alkpubsub

EVENTS = 10_000
KILLS_AFTER = (2_000, 5_000, 8_000)
"""Acked-event counts at which the consumer is killed."""

# The consumer logs (unbuffered) "R <id>" when an event arrives and "A <id>"
# once its ack returned. An "R" after an "A" of the same id: delivered again
# after the ack had returned.
CONSUMER = """
import asyncio, os, sys
import alkpubsub

async def main(url, log):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    transport = await alkpubsub.connect(url)
    async with transport.subscribe("orders:>", consumer="billing", start="earliest") as sub:
        async for event in sub:
            os.write(fd, ("R " + event.id + "\\n").encode())
            await sub.ack(event)
            os.write(fd, ("A " + event.id + "\\n").encode())

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def lines(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    return [
        (kind, event_id)
        for kind, _, event_id in (x.partition(" ") for x in log.read_text().splitlines())
        if event_id
    ]


def received(log: Path) -> set[str]:
    return {event_id for kind, event_id in lines(log) if kind == "R"}


def delivered_again_after_ack(log: Path) -> int:
    acked: set[str] = set()
    again = 0
    for kind, event_id in lines(log):
        if kind == "A":
            acked.add(event_id)
        elif event_id in acked:
            again += 1
    return again


async def run_until(url: str, log: Path, count: int, *, kill: bool) -> None:
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", CONSUMER, url, str(log))
    deadline = time.monotonic() + 60
    try:
        while len(received(log)) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"the consumer got {len(received(log))} of {count} events in 60 s")
            if child.returncode is not None:
                pytest.fail(f"the consumer exited with {child.returncode}")
            await asyncio.sleep(0.005)
    finally:
        child.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        await child.wait()


@pytest.mark.parametrize("mode", ["saved", "batched"])
async def test_acked_events_delivered_again_after_three_sigkills(
    tmp_path: Path, mode: str, figures: Callable[[str], None]
) -> None:
    db = tmp_path / "app.db"
    url = f"honker+durable://{db}?ack={mode}"
    publisher = await alkpubsub.connect(f"honker+durable://{db}")
    for start in range(0, EVENTS, 500):
        await publisher.publish_many(
            [("orders:created", {"n": i}) for i in range(start, start + 500)]
        )
    await publisher.close()
    log = tmp_path / "acked.log"
    for count in KILLS_AFTER:
        await run_until(url, log, count, kill=True)
    await run_until(url, log, EVENTS, kill=False)
    again = delivered_again_after_ack(log)
    assert len(received(log)) == EVENTS  # nothing lost
    figures(
        f"RELIABILITY honker+durable ack={mode}: events={EVENTS} kills={len(KILLS_AFTER)} "
        f"acked_then_delivered_again={again}"
    )
    if mode == "saved":
        assert again == 0
    else:
        assert again <= 3 * 1000, "more redeliveries than a few milliseconds of acks"


async def test_saved_acks_out_of_order_never_wait_for_an_event_not_yet_acked(
    tmp_path: Path,
) -> None:
    url = f"honker+durable://{tmp_path / 'a.db'}?ack=saved"
    transport = await alkpubsub.connect(url)
    await transport.publish_many([("orders:x", i) for i in range(3)])
    async with transport.subscribe("orders:>", consumer="c", start="earliest") as sub:
        first, second, third = [await sub.get(timeout=5) for _ in range(3)]
        # Acked ahead of "first": returns at once (nothing new is coverable).
        await asyncio.wait_for(sub.ack(second), 2)
        await sub.nack(first)  # delivered again, then acked: now all are covered
        again = await sub.get(timeout=5)
        assert again.id == first.id
        await asyncio.wait_for(sub.ack(again), 2)
        await asyncio.wait_for(sub.ack(third), 2)
        assert sub.saved_position == third.offset  # type: ignore[attr-defined]
    await transport.close()


async def test_a_bad_ack_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(alkpubsub.ConfigError, match="ack=batched or ack=saved"):
        await alkpubsub.connect(f"honker+durable://{tmp_path / 'a.db'}?ack=sometimes")
