"""SQLAlchemy tables: conversations, turns, images, usage ledger, quotas, access rules, processed events, API keys.

One schema for SQLite (default) and PostgreSQL; Alembic revisions in ``migrations/`` create it.
Images are stored once per content hash (platform URLs expire, threads outlive them).

Timestamps have no column defaults on purpose: :class:`storage.Database` stamps every row from its
one injectable clock, so quotas, reports, purges and event pruning all compare times from the same
source (a forgotten stamp fails loudly as a NOT NULL violation instead of silently using the wall clock).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "ID_LENGTHS",
    "AccessRule",
    "ApiKey",
    "Base",
    "Conversation",
    "FollowedThread",
    "ImageBlob",
    "ProcessedEvent",
    "QuotaSetting",
    "Turn",
    "UsageEntry",
    "Worker",
    "utcnow",
]

# Stable constraint names so Alembic migrations are portable between SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The production clock: aware UTC.  :class:`storage.Database` takes any other clock in its place."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(timezone=True)}  # noqa: RUF012  (SQLAlchemy API)


class Conversation(Base):
    """A chat thread: (platform, workspace, channel, thread root).  ``reset`` archives it and starts anew."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    workspace: Mapped[str] = mapped_column(String(128))
    channel: Mapped[str] = mapped_column(String(128))
    thread: Mapped[str] = mapped_column(String(128))
    preset: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()
    archived_at: Mapped[datetime | None] = mapped_column(default=None)

    turns: Mapped[list[Turn]] = relationship(back_populates="conversation", order_by="Turn.seq", lazy="raise")

    __table_args__ = (
        # At most one live conversation per thread (partial unique index, both databases).
        Index(
            "uq_conversations_live_thread",
            "platform",
            "workspace",
            "channel",
            "thread",
            unique=True,
            sqlite_where=text("archived_at IS NULL"),
            postgresql_where=text("archived_at IS NULL"),
        ),
        Index("ix_conversations_updated_at", "updated_at"),
    )


class ImageBlob(Base):
    """Image bytes, stored once per SHA-256."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    mime: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column()


class Turn(Base):
    """One message in a conversation; assistant turns carry status, token counts and timings."""

    __tablename__ = "turns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))  # user | assistant
    text: Mapped[str] = mapped_column(Text, default="")
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"))
    user_id: Mapped[str | None] = mapped_column(String(128))
    # assistant: pending|streaming|done|failed|interrupted; user: done, or retried (asked again by a retry of
    # its event: kept, not sent to the model again)
    status: Mapped[str] = mapped_column(String(16), default="done")
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    ttft_ms: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()
    worker: Mapped[str | None] = mapped_column(String(64))  # the bot process answering it (:class:`Worker`)

    conversation: Mapped[Conversation] = relationship(back_populates="turns", lazy="raise")

    __table_args__ = (UniqueConstraint("conversation_id", "seq"), Index("ix_turns_status", "status"))


class UsageEntry(Base):
    """The usage ledger, summed for quotas and reports: one row per admitted request.

    Written when the request is admitted (its reservation: one request, its new pictures), so a quota
    check counts requests still being answered; the final write adds the answer's tokens and turn, or
    deletes the row when the bot failed to answer (see :meth:`storage.Database.admission`).
    """

    __tablename__ = "usage_ledger"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column()
    platform: Mapped[str] = mapped_column(String(32))
    workspace: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(128))
    turn_id: Mapped[int | None] = mapped_column(ForeignKey("turns.id", ondelete="SET NULL"))
    requests: Mapped[int] = mapped_column(Integer, default=1)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    images: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (
        Index("ix_usage_user_at", "platform", "workspace", "user_id", "at"),
        Index("ix_usage_workspace_at", "platform", "workspace", "at"),
    )


class QuotaSetting(Base):
    """Per-user or per-workspace limits; ``None`` means "use the configured default"."""

    __tablename__ = "quota_settings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))  # user | workspace
    platform: Mapped[str] = mapped_column(String(32))
    workspace: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(128), default="")  # "" for workspace scope
    requests_per_day: Mapped[int | None] = mapped_column(Integer)
    requests_per_month: Mapped[int | None] = mapped_column(Integer)
    tokens_per_day: Mapped[int | None] = mapped_column(Integer)
    tokens_per_month: Mapped[int | None] = mapped_column(Integer)
    images_per_day: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column()

    __table_args__ = (UniqueConstraint("scope", "platform", "workspace", "user_id"),)


class AccessRule(Base):
    """Allow/deny entries for users, channels and workspaces."""

    __tablename__ = "access_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action: Mapped[str] = mapped_column(String(8))  # allow | deny
    target: Mapped[str] = mapped_column(String(16))  # user | channel | workspace | role
    platform: Mapped[str] = mapped_column(String(32))
    value: Mapped[str] = mapped_column(String(128))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column()

    __table_args__ = (UniqueConstraint("action", "target", "platform", "value"),)


class ProcessedEvent(Base):
    """Platform event ids already handled: retries and redeliveries hit the primary key and are ignored —
    unless the answer the event got (``turn_id``) failed or was interrupted: then a retry is answered again.

    ``turn_id`` is a soft link (no foreign key): a purge may delete the turn, and an event whose answer is
    gone counts as answered.
    """

    __tablename__ = "processed_events"

    platform: Mapped[str] = mapped_column(String(32), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    received_at: Mapped[datetime] = mapped_column()
    turn_id: Mapped[int | None] = mapped_column(Integer)  # the answer turn, once stored (:meth:`add_turns`)


class Worker(Base):
    """A running bot process, with a heartbeat.  With several processes on one database, an unfinished
    answer is marked interrupted only when the process writing it is gone (no heartbeat), never because
    another process restarted."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column()
    seen_at: Mapped[datetime] = mapped_column()


class FollowedThread(Base):
    """Threads the bot was addressed in (a mention, a DM, ``reset``): later pictures there need no mention.

    Kept in SQL so that following survives a restart; one row per thread, touched on each address.
    """

    __tablename__ = "followed_threads"

    platform: Mapped[str] = mapped_column(String(32), primary_key=True)
    workspace: Mapped[str] = mapped_column(String(128), primary_key=True)
    channel: Mapped[str] = mapped_column(String(128), primary_key=True)
    thread: Mapped[str] = mapped_column(String(128), primary_key=True)
    addressed_at: Mapped[datetime] = mapped_column()

    __table_args__ = (Index("ix_followed_threads_addressed_at", "addressed_at"),)


class ApiKey(Base):
    """A secret key that stands for one user of one workspace on an HTTP API platform (``openai``).

    Only a hash of the key is kept (:meth:`storage.Database.create_api_key` prints the key once): ``key_id``
    is the key's public part, found by index, and ``secret_hash`` the SHA-256 of the whole key, compared in
    constant time.  A revoked key keeps its row (``revoked_at``) so ``admin keys list`` still shows whose it was.
    """

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    platform: Mapped[str] = mapped_column(String(32))
    workspace: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(128))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


def _length(column: Any) -> int:
    """The declared length of a ``String(n)`` column."""
    length = column.type.length
    assert isinstance(length, int), column
    return length


ID_LENGTHS: dict[str, int] = {
    "platform": _length(Conversation.__table__.c.platform),
    "workspace": _length(Conversation.__table__.c.workspace),
    "channel": _length(Conversation.__table__.c.channel),
    "thread": _length(Conversation.__table__.c.thread),
    "user": _length(Turn.__table__.c.user_id),
    "event_id": _length(ProcessedEvent.__table__.c.event_id),
}
"""The longest platform ids the tables store, per request field (PostgreSQL enforces them; SQLite does not,
so the core checks them for both: a front end sending longer ids gets the same clear refusal everywhere)."""
