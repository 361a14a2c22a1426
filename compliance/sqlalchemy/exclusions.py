"""Suite tests excluded by name, each with its reason.

``same_on_pysqlite.txt`` lists the tests that fail the same way with
SQLAlchemy's own ``sqlite+pysqlite`` driver under requirements.py: the suite's
reflection fixtures expect what this SQLAlchemy release's SQLite dialect does
not give (mostly tables of the ``test_schema`` schema, which SQLite has only as
an attached database), whatever the driver. run.py runs each of them against
pysqlite in the same run and fails if one passes there, so this list can never
hide a fault of the Honker driver.

``HONKER`` are what the Honker driver itself cannot do, and why."""

from __future__ import annotations

from pathlib import Path

SAME_ON_PYSQLITE = frozenset(
    line.strip()
    for line in (Path(__file__).parent / "same_on_pysqlite.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)

HONKER = {
    "RowFetchTest::test_row_with_dupe_names": (
        "honker returns rows as dicts keyed by column name, so two result columns with "
        "the same name cannot both be read; the driver raises NotSupportedError naming "
        "the fix (label them) instead of returning a short row"
    ),
}


def key_of(nodeid: str) -> str:
    """``Class::test[params]`` without the file and the backend suffix SQLAlchemy
    adds to the class name (``_sqlite+honker_3_45_1``)."""
    test = nodeid.split("::", 1)[-1]
    cls, _, rest = test.partition("::")
    return f"{cls.split('_sqlite+', 1)[0]}::{rest}"


def reason_for(nodeid: str, *, driver: str) -> str | None:
    """Why the test ``nodeid`` is excluded when running ``driver``, or None."""
    if driver != "honker":
        return None
    key = key_of(nodeid)
    if key in SAME_ON_PYSQLITE:
        return "fails the same way on SQLAlchemy's own pysqlite driver (run.py checks it)"
    return HONKER.get(key.split("[", 1)[0])
