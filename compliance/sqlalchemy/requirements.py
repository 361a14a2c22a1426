"""What the Honker dialect supports, for SQLAlchemy's compliance suite.

SuiteRequirements' defaults describe a generic database. Each override says
why the Honker dialect differs: SQLite can do more than the default assumes
(opened), or honker's API cannot offer what SQLite could (closed, with the
reason). The closing note of the issue lists the excluded parts."""

from __future__ import annotations

from typing import Any

from sqlalchemy.testing import exclusions
from sqlalchemy.testing.requirements import SuiteRequirements

HONKER_HAS_NO_ATTACH = (
    "attached databases (schemas) are not supported: honker's reader pool would not "
    "have them, and ATTACH cannot run inside the write transaction"
)
TEMP_ON_WRITER_ONLY = (
    "TEMP tables live on honker's writer connection only; reads outside a write "
    "transaction go to the reader pool, which cannot see them"
)


class Requirements(SuiteRequirements):
    # -- what SQLite can do (SuiteRequirements assumes less) ----------------------

    @property
    def views(self) -> Any:
        return exclusions.open()

    @property
    def ctes(self) -> Any:
        return exclusions.open()

    @property
    def ctes_on_dml(self) -> Any:
        return exclusions.open()

    @property
    def ctes_with_values(self) -> Any:
        return exclusions.open()

    @property
    def window_functions(self) -> Any:
        return exclusions.open()

    @property
    def json_type(self) -> Any:
        return exclusions.open()

    @property
    def savepoints(self) -> Any:
        return exclusions.open()

    @property
    def autocommit(self) -> Any:
        return exclusions.open()

    @property
    def isolation_level(self) -> Any:
        return exclusions.open()

    def get_isolation_levels(self, config: Any) -> dict[str, Any]:
        return {"default": "SERIALIZABLE", "supported": ["SERIALIZABLE", "AUTOCOMMIT"]}

    @property
    def datetime_microseconds(self) -> Any:
        return exclusions.open()

    @property
    def timestamp_microseconds(self) -> Any:
        return exclusions.open()

    @property
    def computed_columns(self) -> Any:
        return exclusions.open()

    @property
    def computed_columns_stored(self) -> Any:
        return exclusions.open()

    @property
    def computed_columns_virtual(self) -> Any:
        return exclusions.open()

    @property
    def nullsordering(self) -> Any:
        return exclusions.open()

    @property
    def check_constraint_reflection(self) -> Any:
        return exclusions.open()

    @property
    def foreign_key_constraint_name_reflection(self) -> Any:
        return exclusions.open()

    @property
    def insert_from_select(self) -> Any:
        return exclusions.open()

    @property
    def fetch_rows_post_commit(self) -> Any:
        return exclusions.open()

    @property
    def independent_connections(self) -> Any:
        return exclusions.open()

    @property
    def empty_inserts(self) -> Any:
        return exclusions.open()

    @property
    def full_returning(self) -> Any:
        return exclusions.open()

    @property
    def reflects_pk_names(self) -> Any:
        return exclusions.open()

    @property
    def inline_check_constraint_reflection(self) -> Any:
        return exclusions.open()

    @property
    def foreign_key_constraint_option_reflection_ondelete(self) -> Any:
        return exclusions.open()

    @property
    def foreign_key_constraint_option_reflection_onupdate(self) -> Any:
        return exclusions.open()

    @property
    def fk_constraint_option_reflection_ondelete_restrict(self) -> Any:
        return exclusions.open()

    @property
    def fk_constraint_option_reflection_ondelete_noaction(self) -> Any:
        return exclusions.open()

    @property
    def fk_constraint_option_reflection_onupdate_restrict(self) -> Any:
        return exclusions.open()

    @property
    def tuple_in(self) -> Any:
        return exclusions.open()

    @property
    def sql_expressions_inserted_as_primary_key(self) -> Any:
        return exclusions.open()

    @property
    def reflect_table_options(self) -> Any:
        return exclusions.open()

    @property
    def computed_columns_reflect_persisted(self) -> Any:
        return exclusions.open()

    # -- what the Honker dialect does not offer --------------------------------

    @property
    def schemas(self) -> Any:
        return exclusions.closed(HONKER_HAS_NO_ATTACH)

    @property
    def cross_schema_fk_reflection(self) -> Any:
        return exclusions.closed(HONKER_HAS_NO_ATTACH)

    @property
    def temp_table_reflection(self) -> Any:
        return exclusions.closed(TEMP_ON_WRITER_ONLY)

    @property
    def temp_table_reflect_indexes(self) -> Any:
        return exclusions.closed(TEMP_ON_WRITER_ONLY)

    @property
    def temp_table_names(self) -> Any:
        return exclusions.closed(TEMP_ON_WRITER_ONLY)

    @property
    def has_temp_table(self) -> Any:
        return exclusions.closed(TEMP_ON_WRITER_ONLY)

    @property
    def temporary_tables(self) -> Any:
        return exclusions.closed(TEMP_ON_WRITER_ONLY)

    @property
    def temporary_views(self) -> Any:
        return exclusions.closed(TEMP_ON_WRITER_ONLY)

    @property
    def parens_in_union_intersect_except(self) -> Any:
        return exclusions.closed("SQLite has no parenthesized SELECTs in a UNION")

    @property
    def unicode_ddl(self) -> Any:
        return exclusions.closed(
            "honker's writer enforces foreign keys (PRAGMA foreign_keys=ON); the suite's "
            "unicode tables declare a foreign key to a non-unique column, which SQLite then "
            "refuses with 'foreign key mismatch'"
        )

    @property
    def server_side_cursors(self) -> Any:
        return exclusions.closed(
            "stream_results/yield_per/AsyncConnection.stream() are accepted, but honker "
            "returns a statement's rows whole, so they read from memory; and the suite's "
            "ServerSideCursorsTest recognises server-side cursors only of drivers it names"
        )
