"""Indexes on the jobs' asset ids.

Deleting or expiring an asset asks which jobs use it (and the foreign key's ``ON DELETE SET NULL``
does the same); without these indexes both scan every job (86 ms per asset at 200,000 jobs).

Revision ID: 0004_asset_indexes
Revises: 0003_hardening
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0004_asset_indexes"
down_revision = "0003_hardening"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_video_asset_id", "jobs", ["video_asset_id"])
    op.create_index("ix_jobs_audio_asset_id", "jobs", ["audio_asset_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_audio_asset_id", table_name="jobs")
    op.drop_index("ix_jobs_video_asset_id", table_name="jobs")
