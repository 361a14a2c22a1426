"""Both Honker transports against the shared conformance suite.

Each test gets its own database file; every transport the factory makes opens
that same file, so one transport can publish and another receive (in this
process they share one honker Database, writer and watcher, as in production).

``garbage_writer`` writes foreign rows into that file from another process with
Python's ``sqlite3`` (in this process a second SQLite library would break
honker's locks): BLOB and non-UTF-8 values, invalid JSON, JSON that is not an
envelope, an envelope whose topic disagrees with its channel, nesting far past
the parser's limit, numbers too large for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_honker import garbage_notifications, write_foreign_rows
from test_honker_durable import garbage_stream_rows

import alkpubsub
from alkpubsub.conformance import GarbageWriter, OtherProcess, TransportFactory, TransportSuite


class TestHonkerConformance(TransportSuite):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"honker://{tmp_path}/events.db"

    @pytest.fixture
    def other_process(self, url: str) -> OtherProcess:
        return OtherProcess(url)

    @pytest.fixture
    def factory(self, url: str) -> TransportFactory:
        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make

    @pytest.fixture
    def garbage_writer(self, tmp_path: Path) -> GarbageWriter:
        async def write(topic: str) -> int:
            rows = garbage_notifications(topic)
            await write_foreign_rows(str(tmp_path / "events.db"), rows)
            return len(rows)

        return write


class TestHonkerDurableConformance(TransportSuite):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"honker+durable://{tmp_path}/events.db?stream=events"

    @pytest.fixture
    def other_process(self, url: str) -> OtherProcess:
        return OtherProcess(url)

    @pytest.fixture
    def factory(self, url: str) -> TransportFactory:
        async def make() -> alkpubsub.Transport:
            return await alkpubsub.connect(url)

        return make

    @pytest.fixture
    def garbage_writer(self, tmp_path: Path) -> GarbageWriter:
        async def write(topic: str) -> int:
            rows = garbage_stream_rows("events", topic)
            await write_foreign_rows(str(tmp_path / "events.db"), rows)
            return len(rows)

        return write
