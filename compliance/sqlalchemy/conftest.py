"""Load SQLAlchemy's pytest plugin and register the dialect under test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from sqlalchemy.dialects import registry

sys.path.insert(0, str(Path(__file__).parent))

registry.register("sqlite.honker", "alkpubsub.storage.sqla_dialect", "HonkerDialect")
registry.register("sqlite.honker_async", "alkpubsub.storage.sqla_dialect", "HonkerAsyncDialect")

pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

import provision  # noqa: E402,F401  (after the plugin: it overrides a SQLite hook)
from sqlalchemy.testing.plugin.pytestplugin import *  # noqa: E402,F403

_sqlalchemy_modifyitems = pytest_collection_modifyitems  # noqa: F405  (from the plugin)


def pytest_collection_modifyitems(  # type: ignore[no-redef]
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """SQLAlchemy's own collection step, then the exclusions (exclusions.py)
    marked as skips with their reasons."""
    from exclusions import reason_for

    _sqlalchemy_modifyitems(session, config, items)
    driver = os.environ.get("ALKPUBSUB_SUITE_DRIVER", "honker")
    for item in items:
        reason = reason_for(item.nodeid, driver=driver)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"excluded: {reason}"))
