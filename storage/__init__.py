"""Honker storage: transactions that write your rows and publish events in one commit.

>>> store = open_store("app.db")                                   # doctest: +SKIP
>>> with store.transaction() as tx:                                # doctest: +SKIP
...     tx.execute("INSERT INTO nodes(id, key) VALUES (?, ?)", (1, "call-1"))
...     tx.publish("nodes:created", {"keys": ["call-1"]})   # durable stream "events"
...     tx.notify("cache:invalidate", {"graph": 1})          # live subscribers only

Events exist exactly when the transaction commits; ``honker+durable://app.db``
and ``honker://app.db`` subscribers in any process see them then. In async
code use ``async with store.atransaction() as tx`` and ``await tx.execute(...)``.

One database is opened once per path per process (:func:`open_store` shares it
by reference); all writes go through one writer thread that groups concurrent
publishes into one commit (see ``docs/decisions/003-honker-group-commit-and-fanout.md``).
Do not open the same file with Python's ``sqlite3`` (or SQLAlchemy's default
driver) in the same process: two SQLite libraries in one process break each
other's file locks. Other processes may use any SQLite client or honker's own API;
rows they write that are not alkpubsub envelopes are read by
:mod:`alkpubsub.storage.rows` (foreign JSON or text adopted as events,
CloudEvents decoded, the rest counted as malformed). alkpubsub's durable
consumers are the rows ``alkpubsub:<name>`` of ``_honker_stream_consumers``
(:mod:`alkpubsub.storage.consumers`), apart from honker's own.

New database files (and their ``-wal``, ``-shm`` and ``-alkpubsub.lock``) are
created owner-only (0600). Notifications older than ``notify_retention``
seconds (default 60) are pruned automatically by each writing process; stream
rows only by :func:`prune` / ``store.prune``. If the file is replaced or
deleted while open, everything on it fails with ``ConnectionLost`` and opening
the path again opens the new file.
"""

from .consumers import CONSUMER_PREFIX, ConsumerLease, StreamConsumer
from .jobs import WriterStats
from .pruning import DEFAULT_NOTIFY_RETENTION
from .retention import PruneCounts, prune
from .rows import (
    FOREIGN_MODES,
    ForeignMode,
    Malformed,
    ParsedRow,
    RowDecoder,
    check_foreign_mode,
    default_foreign_topic,
    parse_row,
)
from .shared import SharedDatabase
from .store import DEFAULT_BUSY_TIMEOUT, Store, open_store
from .stores import SYSTEM, Stores, check_org_id, tenant_file
from .transaction import (
    DEFAULT_STREAM,
    AsyncStoreTransaction,
    StoreTransaction,
    build_event,
    check_stream_name,
)
from .watcher import Watcher

__all__ = [
    "CONSUMER_PREFIX",
    "DEFAULT_BUSY_TIMEOUT",
    "DEFAULT_NOTIFY_RETENTION",
    "DEFAULT_STREAM",
    "FOREIGN_MODES",
    "SYSTEM",
    "AsyncStoreTransaction",
    "ConsumerLease",
    "ForeignMode",
    "Malformed",
    "ParsedRow",
    "PruneCounts",
    "RowDecoder",
    "SharedDatabase",
    "Store",
    "StoreTransaction",
    "Stores",
    "StreamConsumer",
    "Watcher",
    "WriterStats",
    "build_event",
    "check_foreign_mode",
    "check_org_id",
    "check_stream_name",
    "default_foreign_topic",
    "open_store",
    "parse_row",
    "prune",
    "tenant_file",
]
