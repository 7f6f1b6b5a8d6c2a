"""Processed events remember the answer they got: a retried event whose answer failed or was interrupted is
answered again, while a redelivery of an answered (or still streaming) event stays refused.

A soft link (no foreign key): a purge may delete the turn; an event whose answer is gone counts as answered.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("processed_events") as batch:
        batch.add_column(sa.Column("turn_id", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("processed_events") as batch:
        batch.drop_column("turn_id")
