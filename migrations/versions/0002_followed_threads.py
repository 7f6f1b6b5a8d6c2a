"""Followed threads: where the bot was addressed, so later pictures there need no mention (survives restarts)."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "followed_threads",
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("workspace", sa.String(128), nullable=False),
        sa.Column("channel", sa.String(128), nullable=False),
        sa.Column("thread", sa.String(128), nullable=False),
        sa.Column("addressed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("platform", "workspace", "channel", "thread", name="pk_followed_threads"),
    )
    op.create_index("ix_followed_threads_addressed_at", "followed_threads", ["addressed_at"])


def downgrade() -> None:
    op.drop_index("ix_followed_threads_addressed_at", table_name="followed_threads")
    op.drop_table("followed_threads")
