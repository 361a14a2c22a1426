"""Alembic environment for a Honker file (tests/test_alembic.py drives it).

``sqlalchemy.url`` is ``sqlite+honker:///<path>``: SQLAlchemy's SQLite dialect
over honker, never Python's ``sqlite3``. ``target_metadata`` (for
autogenerate) comes from ``config.attributes["target_metadata"]`` when the
caller passes it. honker's own tables (``_honker_*``) share the file; the
dialect's reflection does not list them, so autogenerate leaves them alone
without an ``include_name`` filter.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

import alkpubsub.storage.sqlalchemy  # noqa: F401  registers sqlite+honker (an entry point too)

config = context.config
target_metadata = config.attributes.get("target_metadata")


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite's ALTER TABLE is limited: batch mode
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
