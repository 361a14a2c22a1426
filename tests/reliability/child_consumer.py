"""A durable consumer in its own process, for the crash scenarios.

Usage: ``python child_consumer.py RECORDS URL TOPIC CONSUMER BUFFER``

Subscribes to ``TOPIC`` as the named ``CONSUMER`` (``start="earliest"``), and
for each event first records it (``event`` line, see ``crash_records``) and
then acks it. Recording first means an event that was processed but whose
ack did not survive a crash is seen twice (a duplicate), never missed. The
test SIGKILLs this process at random points; SIGTERM closes the subscription
(saving progress) and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

from crash_records import RecordWriter, die_with_parent, is_whole

import alkpubsub


async def consume(url: str, topic: str, consumer: str, out: RecordWriter, buffer: int) -> None:
    """Record and ack every event until SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    transport = await alkpubsub.connect(url)
    sub = transport.subscribe(topic, consumer=consumer, start="earliest", buffer=buffer)
    await sub.start()
    out.write("ready", time.monotonic())

    async def report() -> None:
        while True:
            out.write("stats", json.dumps(sub.stats.as_dict(), separators=(",", ":")))
            await asyncio.sleep(0.5)

    async def process() -> None:
        async for event in sub:
            whole = int(event.topic == topic and is_whole(event.payload))
            n = event.payload.get("n", -1) if isinstance(event.payload, dict) else -1
            out.write("event", n, event.id, event.offset, time.monotonic(), whole)
            await sub.ack(event)

    reporter = asyncio.create_task(report())
    worker = asyncio.create_task(process())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({worker, stopper}, return_when=asyncio.FIRST_COMPLETED)
    reporter.cancel()
    if worker.done():
        worker.result()  # the subscription failed: exit non-zero with the error
    worker.cancel()
    await sub.close()
    out.write("stats", json.dumps(sub.stats.as_dict(), separators=(",", ":")))
    await transport.close()


def main() -> None:
    """Parse argv and run."""
    die_with_parent()
    records, url, topic, consumer, buffer = sys.argv[1:6]
    asyncio.run(consume(url, topic, consumer, RecordWriter(records), int(buffer)))


if __name__ == "__main__":
    main()
