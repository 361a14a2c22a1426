"""Helpers shared by the SQLAlchemy-over-Honker attack tests: an engine on a
scratch file with a short busy_timeout, and bounded waits that fail instead of
hanging the suite."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from alkpubsub.storage.sqlalchemy import create_engine

BUSY = 1.0
"""busy_timeout of every engine here (seconds)."""


def db(tmp_path: Path, name: str = "app.db") -> str:
    return str(tmp_path / name)


def engine_on(tmp_path: Path, name: str = "app.db", busy: float = BUSY, **kwargs: Any) -> Engine:
    """An engine on a scratch file with table ``t (id, x)``."""
    kwargs.setdefault("connect_args", {"busy_timeout": busy})
    engine = create_engine(db(tmp_path, name), **kwargs)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, x)"))
    return engine


def bounded(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """fn() on a thread; fail (not hang) if it does not finish in time."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), f"{fn} still running after {timeout} s (hang)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def write_ok(engine: Engine, x: int = 12345, timeout: float = BUSY * 3 + 2) -> float:
    """A fresh session (on another thread) can write and commit within the
    bound; returns how long it took."""

    def work() -> None:
        with Session(engine) as s:
            s.execute(text("INSERT INTO t(x) VALUES (:x)"), {"x": x})
            s.commit()

    t0 = time.monotonic()
    bounded(work, timeout)
    return time.monotonic() - t0


def xs(engine: Engine) -> list[Any]:
    with engine.connect() as c:
        return [r[0] for r in c.execute(text("SELECT x FROM t ORDER BY id")).all()]
