"""What the cases share during one run: a temp folder and throwaway brokers.

Brokers are started on first use, on free ports, by the same ``RedisServer`` /
``NatsServer`` classes the tests use (tests/brokers.py), and stopped at the end
of the run. Never the system's redis on 6379 or nats on 4222.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .measure import Unavailable

ROOT = Path(__file__).resolve().parent.parent
_BIN_DIRS = "/usr/sbin:/usr/local/sbin:/sbin"


def _brokers_module() -> Any:
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    try:
        import brokers  # tests/brokers.py
    except Exception as exc:
        reason = f"tests/brokers.py failed to import ({type(exc).__name__}: {exc})"
        raise Unavailable(reason) from exc
    return brokers


class Env:
    """Resources for one benchmark run; close it at the end."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="alkpubsub-bench-"))
        self._counter = itertools.count(1)
        self._servers: dict[str, Any] = {}
        self._failed: dict[str, str] = {}

    def path(self, stem: str = "bench") -> Path:
        """A fresh file path in the run's temp folder (nothing is created)."""
        return self.dir / f"{stem}-{next(self._counter)}.db"

    def unique(self, stem: str) -> str:
        """A name not used before in this run (streams, consumers, topics)."""
        return f"{stem}{next(self._counter)}"

    def redis_url(self) -> str:
        """URL of this run's redis-server (started on first call)."""
        return str(self._server("redis-server").url)

    def nats_url(self) -> str:
        """URL of this run's nats-server with JetStream (started on first call)."""
        return str(self._server("nats-server").url)

    def _server(self, binary: str) -> Any:
        if binary in self._failed:
            raise Unavailable(self._failed[binary])
        if binary not in self._servers:
            try:
                self._servers[binary] = self._start(binary)
            except Unavailable as exc:
                self._failed[binary] = str(exc)
                raise
        return self._servers[binary]

    def _start(self, binary: str) -> Any:
        if not (shutil.which(binary) or shutil.which(binary, path=_BIN_DIRS)):
            raise Unavailable(f"{binary} is not installed (apt-get install {binary})")
        brokers = _brokers_module()
        cls = brokers.RedisServer if binary == "redis-server" else brokers.NatsServer
        base = self.dir / binary
        # Redis: no AOF, so the disk does not pace the broker rows.
        server = (
            cls(base_dir=base, appendonly=False) if binary == "redis-server" else cls(base_dir=base)
        )
        try:
            server.start()
        except Exception as exc:
            raise Unavailable(f"{binary} did not start ({type(exc).__name__}: {exc})") from exc
        return server

    def close(self) -> None:
        """Stop the brokers and remove the temp folder."""
        for server in self._servers.values():
            with contextlib.suppress(Exception):
                server.close()
        self._servers.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
