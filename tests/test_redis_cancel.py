"""A cancellation is never turned into ConnectionLost (a caller that retries on
ConnectionLost would otherwise never stop)."""

from __future__ import annotations

import asyncio

from alkpubsub import ConnectionLost
from alkpubsub.transports._redis_common import translate
from alkpubsub.transports.redis import from_url


async def test_an_error_raised_while_the_task_is_being_cancelled_stays_a_cancellation() -> None:
    target = from_url("redis://127.0.0.1:1/0").target
    assert isinstance(translate(OSError("reset"), target, "publishing"), ConnectionLost)

    async def publishing() -> BaseException:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            # What redis-py may raise when the cancel lands mid-command.
            return translate(TimeoutError(), target, "publishing")
        raise AssertionError("not cancelled")

    task = asyncio.create_task(publishing())
    await asyncio.sleep(0)
    task.cancel()
    assert isinstance(await task, asyncio.CancelledError)
