"""Alembic migrations on a Honker file through ``sqlite+honker://``
(tests/alembic_project: two revisions, the second in batch mode)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Engine, Index, Integer, MetaData, String, Table, inspect, text
from sqlalchemy.exc import OperationalError

from alkpubsub.storage import open_store
from alkpubsub.storage.sqlalchemy import create_engine

PROJECT = Path(__file__).resolve().parent / "alembic_project"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    # a copy: autogenerate writes new revisions into versions/
    copy = tmp_path / "migrations"
    shutil.copytree(PROJECT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "app.db"


@pytest.fixture
def config(project: Path, db: Path) -> Config:
    config = Config()
    config.set_main_option("script_location", str(project))
    config.set_main_option("sqlalchemy.url", f"sqlite+honker:///{db}")  # 4 slashes: absolute
    return config


@pytest.fixture
def engine(db: Path) -> Iterator[Engine]:
    engine = create_engine(db)
    yield engine
    engine.dispose()


def columns(engine: Engine, table: str) -> dict[str, tuple[str, bool]]:
    return {
        column["name"]: (str(column["type"]), bool(column["nullable"]))
        for column in inspect(engine).get_columns(table)
    }


def indexes(engine: Engine, table: str) -> dict[str, list[str | None]]:
    return {
        str(index["name"]): list(index["column_names"])
        for index in inspect(engine).get_indexes(table)
    }


def version(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())


def user_tables(engine: Engine) -> set[str]:
    return {name for name in inspect(engine).get_table_names() if not name.startswith("_honker_")}


def models(*extra: Column[Any]) -> MetaData:
    """The application's models: the schema of revision 0002, plus ``extra``."""
    metadata = MetaData()
    Table(
        "widgets",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(50), nullable=False),
        Column("price", Integer, nullable=True),
        *extra,
        Index("ix_widgets_name", "name"),
    )
    return metadata


def test_upgrade_downgrade_upgrade_on_a_fresh_file(config: Config, engine: Engine) -> None:
    command.upgrade(config, "0001")
    assert user_tables(engine) == {"alembic_version", "widgets"}
    assert columns(engine, "widgets") == {"id": ("INTEGER", False), "name": ("VARCHAR(50)", False)}
    assert version(engine) == ["0001"]
    with engine.begin() as connection:  # rows that the batch copy must carry over
        connection.execute(text("INSERT INTO widgets (name) VALUES ('bolt'), ('nut')"))

    command.upgrade(config, "head")
    assert columns(engine, "widgets") == {
        "id": ("INTEGER", False),
        "name": ("VARCHAR(50)", False),
        "price": ("INTEGER", True),
    }
    assert indexes(engine, "widgets") == {"ix_widgets_name": ["name"]}
    assert version(engine) == ["0002"]
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id, name, price FROM widgets ORDER BY id")).all()
    assert [tuple(row) for row in rows] == [(1, "bolt", None), (2, "nut", None)]

    command.downgrade(config, "0001")
    assert columns(engine, "widgets") == {"id": ("INTEGER", False), "name": ("VARCHAR(50)", False)}
    assert indexes(engine, "widgets") == {}
    command.downgrade(config, "base")
    assert user_tables(engine) == {"alembic_version"}
    assert version(engine) == []
    # honker's own tables were left alone (reflection lists them only on request)
    internal = inspect(engine).get_table_names(sqlite_include_internal=True)
    assert {"_honker_stream", "_honker_live"} <= set(internal)

    command.upgrade(config, "head")
    assert "price" in columns(engine, "widgets")
    assert indexes(engine, "widgets") == {"ix_widgets_name": ["name"]}
    assert version(engine) == ["0002"]


def test_alembic_command_line_upgrades_the_file(project: Path, db: Path, engine: Engine) -> None:
    ini = project.parent / "alembic.ini"
    ini.write_text(
        f"[alembic]\nscript_location = {project}\nsqlalchemy.url = sqlite+honker:///{db}\n"
    )
    for args, expect in ((["upgrade", "head"], ""), (["current"], "0002 (head)")):
        done = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ini), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert expect in done.stdout
    assert version(engine) == ["0002"]
    assert indexes(engine, "widgets") == {"ix_widgets_name": ["name"]}


def test_autogenerate_writes_the_new_column_and_check_is_then_clean(
    config: Config, engine: Engine, project: Path
) -> None:
    command.upgrade(config, "head")
    config.attributes["target_metadata"] = models(Column("color", String(20), nullable=True))

    script = command.revision(config, message="widget color", autogenerate=True, rev_id="0003")
    assert script is not None and not isinstance(script, list)
    source = Path(str(script.path)).read_text()
    assert "batch_op.add_column(sa.Column('color', sa.String(length=20), nullable=True))" in source
    assert "batch_op.drop_column('color')" in source
    # nothing else differs: no spurious type/index changes, honker's tables ignored
    assert source.count("batch_op.") == 2
    assert "_honker" not in source and "drop_table" not in source
    assert ScriptDirectory.from_config(config).get_current_head() == "0003"

    command.upgrade(config, "head")
    assert columns(engine, "widgets")["color"] == ("VARCHAR(20)", True)
    command.check(config)  # raises if the models and the file still differ


def test_autogenerate_leaves_honkers_tables_alone_without_a_filter(
    config: Config, engine: Engine, db: Path
) -> None:
    # honker's tables live in the same file, and env.py has no include_name
    # filter: the dialect's reflection does not list them, so a comparison
    # with the models finds nothing to drop.
    command.upgrade(config, "head")
    with open_store(db) as store, store.transaction() as tx:  # the file in use for events
        tx.publish("app:started", {})
        tx.enqueue("jobs", {})
    assert "_honker_stream" in inspect(engine).get_table_names(sqlite_include_internal=True)
    assert "_honker_stream" not in inspect(engine).get_table_names()
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), models()) == []
        diffs = compare_metadata(MigrationContext.configure(connection), MetaData())
    # the same comparison still sees the application's own tables
    assert {diff[1].name for diff in diffs if diff[0] == "remove_table"} == {"widgets"}


BROKEN = """
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("gadgets", sa.Column("id", sa.Integer, primary_key=True))
    op.execute("INSERT INTO widgets (name) VALUES ('half-done')")
    op.execute("INSERT INTO no_such_table VALUES (1)")


def downgrade():
    op.drop_table("gadgets")
"""


def test_a_failing_migration_leaves_nothing_of_itself(
    config: Config, engine: Engine, project: Path
) -> None:
    command.upgrade(config, "head")
    (project / "versions" / "0003_broken.py").write_text(BROKEN)
    with pytest.raises(OperationalError, match="no such table: no_such_table"):
        command.upgrade(config, "head")
    # SQLite's DDL is transactional and the driver runs it in one write
    # transaction: the new table, the row and the version bump all rolled back
    assert user_tables(engine) == {"alembic_version", "widgets"}
    assert version(engine) == ["0002"]
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM widgets")).scalar() == 0
