"""The registry of benchmark rows: one module per transport.

Each module exposes ``cases(env) -> list[Case]``. A module must import without
its client library or transport module present: those are imported inside the
measures and declared in ``Case.ours_needs`` / ``raw_needs``, so a missing
piece turns into a "not available: <reason>" row instead of a missing one.
"""

from __future__ import annotations

import importlib

from ..case import Case
from ..env import Env

TRANSPORTS: tuple[str, ...] = ("inprocess", "honker", "redis", "nats", "multinode", "hub")


def load(transport: str, env: Env) -> list[Case]:
    """The cases of ``transport`` (a name from :data:`TRANSPORTS`)."""
    module = importlib.import_module(f"{__name__}.{transport}")
    cases: list[Case] = module.cases(env)
    return cases
