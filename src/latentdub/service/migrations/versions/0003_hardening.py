"""Service hardening: the job outbox, result expiry and the watermark opt-out permission.

* ``jobs.dispatched_at``: when the broker accepted the job's message (NULL: not yet), so the
  service re-publishes queued jobs whose message never left while it runs (the outbox).
* ``jobs.expired_at``: when the storage sweep removed the job's result file.
* ``api_keys.allow_no_watermark``: the key may turn the invisible watermark off (default: no).

Jobs already in the database count as dispatched (they were sent, or are re-sent at start-up).

Revision ID: 0003_hardening
Revises: 0002_key_usage
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_hardening"
down_revision = "0002_key_usage"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, never batch mode: on SQLite a batch copy drops and re-creates the table,
    # and with foreign keys on, dropping api_keys would cascade to key_usage and unlink every job.
    op.add_column("jobs", sa.Column("dispatched_at", sa.DateTime(timezone=False), nullable=True))
    op.add_column("jobs", sa.Column("expired_at", sa.DateTime(timezone=False), nullable=True))
    op.add_column(
        "api_keys", sa.Column("allow_no_watermark", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    jobs = sa.table("jobs", sa.column("dispatched_at", sa.DateTime()), sa.column("created_at", sa.DateTime()))
    op.execute(jobs.update().values(dispatched_at=jobs.c.created_at))
    op.create_index("ix_jobs_dispatched_at", "jobs", ["status", "dispatched_at"])
    op.create_index("ix_webhook_deliveries_next_attempt_at", "webhook_deliveries", ["next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_next_attempt_at", table_name="webhook_deliveries")
    op.drop_index("ix_jobs_dispatched_at", table_name="jobs")
    op.drop_column("api_keys", "allow_no_watermark")  # SQLite ≥ 3.35 drops a column in place
    op.drop_column("jobs", "expired_at")
    op.drop_column("jobs", "dispatched_at")
