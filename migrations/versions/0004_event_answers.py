"""Processed events remember the answer they got: a retried event whose answer failed or was interrupted is
answered again, while a redelivery of an answered (or still streaming) event stays refused.

A soft link (no foreign key): a purge may delete the turn; an event whose answer is gone counts as answered.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("processed_events") as batch:
        batch.add_column(sa.Column("turn_id", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("processed_events") as batch:
        batch.drop_column("turn_id")
