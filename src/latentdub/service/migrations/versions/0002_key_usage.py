"""key_usage: jobs submitted per API key and UTC day (the daily quota's counter).

Filled from the jobs still in the database, so an upgrade during the day keeps what the key
already used (jobs deleted before the upgrade cannot be counted any more).

Revision ID: 0002_key_usage
Revises: 0001_initial
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_key_usage"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_usage",
        sa.Column("api_key_id", sa.String(36), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("jobs", sa.Integer(), nullable=False),
        sa.CheckConstraint("jobs >= 0", name="ck_key_usage_jobs"),
        sa.ForeignKeyConstraint(
            ["api_key_id"], ["api_keys.id"], name="fk_key_usage_api_key_id_api_keys", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("api_key_id", "day", name="pk_key_usage"),
    )
    jobs = sa.table("jobs", sa.column("api_key_id", sa.String()), sa.column("created_at", sa.DateTime()))
    # CAST(… AS DATE) means a number on SQLite; its date() gives the 'YYYY-MM-DD' a Date column holds.
    if op.get_bind().dialect.name == "sqlite":
        day = sa.func.date(jobs.c.created_at)
    else:
        day = sa.cast(jobs.c.created_at, sa.Date())
    usage = sa.table("key_usage", sa.column("api_key_id"), sa.column("day"), sa.column("jobs"))
    op.execute(
        usage.insert().from_select(
            ["api_key_id", "day", "jobs"],
            sa.select(jobs.c.api_key_id, day, sa.func.count())
            .where(jobs.c.api_key_id.is_not(None))
            .group_by(jobs.c.api_key_id, day),
        )
    )


def downgrade() -> None:
    op.drop_table("key_usage")
