"""Provisioning hooks for the suite: SQLAlchemy's SQLite ones, except that no
``test_schema`` database is attached (attached databases are not supported:
honker's reader pool would not have them; see requirements.py)."""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy.dialects.sqlite.provision  # noqa: F401  (registers the sqlite hooks)
from sqlalchemy import event
from sqlalchemy.testing.provision import post_configure_engine


@post_configure_engine.for_db("sqlite")
def _post_configure_engine(url: Any, engine: Any, follower_ident: Any) -> None:
    @event.listens_for(engine, "engine_disposed")
    def dispose(engine: Any) -> None:
        filename = engine.url.database
        for path in (filename, f"{filename}-wal", f"{filename}-shm", f"{filename}-alkpubsub.lock"):
            if filename and os.path.exists(path):
                os.remove(path)
