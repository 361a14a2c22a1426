"""Another process on the same bus, file or broker, for the conformance suite.

A transport's test module overrides the suite's ``other_process`` fixture with
``OtherProcess(url)`` (or a list of URLs, for a composite) when a second
process can reach what its ``factory`` connects to. The child
(``python -m alkpubsub.conformance.processes``) connects, says it is ready,
waits for the word to go, publishes, and prints the ids it published.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

READY = "ready"


@dataclass(frozen=True)
class OtherProcess:
    """Publishes from a child process to ``url`` (a list of URLs: a composite)."""

    url: str | Sequence[str]

    async def start(self, topic: str, count: int) -> RunningPublisher:
        """Start the child; return once it is connected and waiting to publish
        ``count`` events ``{"n": i}`` to ``topic``."""
        spec = json.dumps({"url": self.url, "topic": topic, "count": count})
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "alkpubsub.conformance.processes",
            spec,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.decode().strip() != READY:
            _, err = await proc.communicate()
            raise RuntimeError(f"publisher process did not start: {err.decode()[-2000:]}")
        return RunningPublisher(proc)


class RunningPublisher:
    """A child started by :meth:`OtherProcess.start`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    def go(self) -> None:
        """Tell the child to publish now."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(b"go\n")

    async def ids(self, timeout: float = 60) -> list[str]:
        """Wait for the child to finish; the ids it published, in order."""
        out, err = await asyncio.wait_for(self._proc.communicate(), timeout)
        if self._proc.returncode != 0:
            raise RuntimeError(f"publisher process failed: {err.decode()[-2000:]}")
        ids = json.loads(out.decode())
        assert isinstance(ids, list)
        return [str(i) for i in ids]


async def _child(spec: dict[str, Any]) -> None:
    import alkpubsub

    url = spec["url"]
    topic, count = str(spec["topic"]), int(spec["count"])
    transport = await alkpubsub.connect(url if isinstance(url, str) else [str(u) for u in url])
    try:
        print(READY, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        ids = [(await transport.publish(topic, {"n": i})).id for i in range(count)]
    finally:
        await transport.close()
    print(json.dumps(ids), flush=True)


if __name__ == "__main__":
    asyncio.run(_child(json.loads(sys.argv[1])))
