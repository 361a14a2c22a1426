"""A publisher in its own process, for the crash scenarios.

Usage: ``python child_publisher.py RECORDS URL TOPIC FIRST COUNT BATCH PACE [DIE_AT DELAY]``

Publishes events ``n = FIRST .. FIRST+COUNT-1`` (payload ``crash_records.payload(n)``)
with ``publish_many`` in batches of ``BATCH``, pausing ``PACE`` seconds between
batches, and records each call (``begin``, then ``accepted`` or ``failed``).
A failed batch is retried with new events, as a careful publisher does while
the broker is away, for up to 60 s.

``DIE_AT``: the process SIGKILLs itself while the ``publish_many`` call for the
batch holding event ``DIE_AT`` is still in flight, ``DELAY`` seconds after it
began (if that call finishes sooner, the next batch is tried with half the
delay, down to none). A parent that
polls the record file could not hit a call a few milliseconds long reliably;
a timer on the publisher's own event loop always does, and SIGKILL is SIGKILL
whoever sends it: no cleanup, no flush, no close.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

from crash_records import RecordWriter, die_with_parent, payload

import alkpubsub

RETRY_FOR = 60.0
"""Seconds a batch is retried before the publisher gives up (exit code 1)."""


async def publish(
    url: str,
    topic: str,
    first: int,
    count: int,
    batch: int,
    pace: float,
    out: RecordWriter,
    die_at: int | None,
    delay: float,
) -> None:
    """Publish ``count`` events from ``first`` and record every call."""
    transport = await alkpubsub.connect(url)
    out.write("ready", time.monotonic())
    loop = asyncio.get_running_loop()
    n = first
    while n < first + count:
        size = min(batch, first + count - n)
        items = [(topic, payload(i)) for i in range(n, n + size)]
        deadline = loop.time() + RETRY_FOR
        while True:
            out.write("begin", n, size, time.monotonic())
            call = asyncio.ensure_future(transport.publish_many(items))
            if die_at is not None and n + size > die_at:
                await asyncio.wait({call}, timeout=delay)
                if not call.done():
                    os.kill(os.getpid(), signal.SIGKILL)
                # It finished first: try the next batch, sooner (0 still lands
                # after the call's first step, once it has begun sending).
                die_at, delay = n + size, delay / 2 if delay > 1e-4 else 0.0
            try:
                events = await call
            except (alkpubsub.ConnectionLost, alkpubsub.PublishError) as exc:
                out.write("failed", n, size, time.monotonic(), type(exc).__name__)
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
                continue
            out.write("accepted", n, size, time.monotonic(), ",".join(e.id for e in events))
            break
        n += size
        if pace:
            await asyncio.sleep(pace)
    out.write("done", time.monotonic())
    await transport.close()


def main() -> None:
    """Parse argv and run."""
    die_with_parent()
    records, url, topic, first, count, batch, pace = sys.argv[1:8]
    die_at = int(sys.argv[8]) if len(sys.argv) > 8 else None
    delay = float(sys.argv[9]) if len(sys.argv) > 9 else 0.0
    out = RecordWriter(records)
    asyncio.run(
        publish(url, topic, int(first), int(count), int(batch), float(pace), out, die_at, delay)
    )


if __name__ == "__main__":
    main()
