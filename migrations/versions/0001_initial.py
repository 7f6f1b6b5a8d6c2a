"""Initial schema: conversations, images, turns, usage ledger, quota settings, access rules, processed events.

Written by hand from ``storage/tables.py`` (constraint names follow its naming convention, so the
schema is the same on SQLite and PostgreSQL; ``tests/storage/test_migrations.py`` compares them).
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

LIVE = "archived_at IS NULL"


def _time(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("workspace", sa.String(128), nullable=False),
        sa.Column("channel", sa.String(128), nullable=False),
        sa.Column("thread", sa.String(128), nullable=False),
        sa.Column("preset", sa.String(64), nullable=True),
        _time("created_at"),
        _time("updated_at"),
        _time("archived_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_conversations"),
    )
    op.create_index(
        "uq_conversations_live_thread",
        "conversations",
        ["platform", "workspace", "channel", "thread"],
        unique=True,
        sqlite_where=sa.text(LIVE),
        postgresql_where=sa.text(LIVE),
    )
    op.create_index("ix_conversations_updated_at", "conversations", ["updated_at"])

    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("mime", sa.String(64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        _time("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_images"),
        sa.UniqueConstraint("sha256", name="uq_images_sha256"),
    )

    op.create_table(
        "turns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("finish_reason", sa.String(16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("ttft_ms", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        _time("created_at"),
        _time("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_turns"),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_turns_conversation_id_conversations",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_turns_image_id_images"),
        sa.UniqueConstraint("conversation_id", "seq", name="uq_turns_conversation_id_seq"),
    )
    op.create_index("ix_turns_status", "turns", ["status"])

    op.create_table(
        "usage_ledger",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        _time("at"),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("workspace", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("turn_id", sa.Integer(), nullable=True),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_ledger"),
        sa.ForeignKeyConstraint(["turn_id"], ["turns.id"], name="fk_usage_ledger_turn_id_turns", ondelete="SET NULL"),
    )
    op.create_index("ix_usage_user_at", "usage_ledger", ["platform", "workspace", "user_id", "at"])
    op.create_index("ix_usage_workspace_at", "usage_ledger", ["platform", "workspace", "at"])

    op.create_table(
        "quota_settings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("workspace", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("requests_per_day", sa.Integer(), nullable=True),
        sa.Column("requests_per_month", sa.Integer(), nullable=True),
        sa.Column("tokens_per_day", sa.Integer(), nullable=True),
        sa.Column("tokens_per_month", sa.Integer(), nullable=True),
        sa.Column("images_per_day", sa.Integer(), nullable=True),
        _time("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_quota_settings"),
        sa.UniqueConstraint(
            "scope", "platform", "workspace", "user_id", name="uq_quota_settings_scope_platform_workspace_user_id"
        ),
    )

    op.create_table(
        "access_rules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(8), nullable=False),
        sa.Column("target", sa.String(16), nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("value", sa.String(128), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        _time("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_access_rules"),
        sa.UniqueConstraint(
            "action", "target", "platform", "value", name="uq_access_rules_action_target_platform_value"
        ),
    )

    op.create_table(
        "processed_events",
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        _time("received_at"),
        sa.PrimaryKeyConstraint("platform", "event_id", name="pk_processed_events"),
    )


def downgrade() -> None:
    op.drop_table("processed_events")
    op.drop_table("access_rules")
    op.drop_table("quota_settings")
    op.drop_index("ix_usage_workspace_at", table_name="usage_ledger")
    op.drop_index("ix_usage_user_at", table_name="usage_ledger")
    op.drop_table("usage_ledger")
    op.drop_index("ix_turns_status", table_name="turns")
    op.drop_table("turns")
    op.drop_table("images")
    op.drop_index("ix_conversations_updated_at", table_name="conversations")
    op.drop_index("uq_conversations_live_thread", table_name="conversations")
    op.drop_table("conversations")
