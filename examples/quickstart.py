"""Quickstart: typed topics with `topic:id` routing on any transport.

Run: python examples/quickstart.py [URL]      (default: memory://)
"""

from __future__ import annotations

import asyncio
import sys

from pydantic import BaseModel

import alkpubsub
from alkpubsub import PubSub


class CallEvent(BaseModel):
    status: str
    progress: int = 0


async def main(url: str) -> None:
    transport = await alkpubsub.connect(url)
    async with transport:
        pubsub = PubSub(transport)
        calls = pubsub.topic("call:{request_id}", CallEvent)

        # Subscribe first: every event published after this line arrives.
        async with calls.subscribe(request_id="req-42") as mine, calls.subscribe() as everyone:
            await calls.publish(CallEvent(status="started"), request_id="req-42")
            await calls.publish(CallEvent(status="started"), request_id="req-7")
            await calls.publish(CallEvent(status="done", progress=100), request_id="req-42")

            for _ in range(2):
                event = await mine.get(timeout=5)
                print(f"req-42 watcher: {event.status} {event.progress}%")
            for _ in range(3):
                await everyone.get(timeout=5)
                assert everyone.current is not None
                print(f"all-calls watcher: {everyone.current.topic}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "memory://"))
