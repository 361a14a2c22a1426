"""widgets: price column and name index

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 00:00:01

"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # recreate="always": the move-and-copy path (new table, copy rows, drop,
    # rename), what SQLite needs for changes its ALTER TABLE cannot make.
    with op.batch_alter_table("widgets", recreate="always") as batch:
        batch.add_column(sa.Column("price", sa.Integer, nullable=True))
        batch.create_index("ix_widgets_name", ["name"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("widgets", recreate="always") as batch:
        batch.drop_index("ix_widgets_name")
        batch.drop_column("price")
