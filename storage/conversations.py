"""Conversations and their turns: threads, the turns stored in them, their pictures, the threads followed.

A thread is named by any object with ``platform``, ``workspace``, ``channel`` and ``thread`` attributes
(:class:`ThreadKey`): the core passes its own :class:`~bot.core.requests.ThreadRef` as it is, so there is one
type for the idea and storage still imports nothing from the core.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from storage.base import Store, affected
from storage.events import link_event
from storage.ledger import settle_usage, unlink_turns
from storage.tables import Conversation, FollowedThread, ImageBlob, Turn

__all__ = ["ConversationStore", "ThreadKey"]


class ThreadKey(Protocol):
    """Identifies a thread on a platform (the core's ``ThreadRef`` is one)."""

    @property
    def platform(self) -> str: ...

    @property
    def workspace(self) -> str: ...

    @property
    def channel(self) -> str: ...

    @property
    def thread(self) -> str: ...


def _columns(key: ThreadKey) -> dict[str, str]:
    return {"platform": key.platform, "workspace": key.workspace, "channel": key.channel, "thread": key.thread}


class ConversationStore(Store):
    """One live conversation per thread (earlier ones archived), its turns in order, pictures once per hash."""

    async def live_conversation(self, key: ThreadKey) -> Conversation | None:
        async with self.sessions() as session:
            return await session.scalar(_live(key))

    async def get_or_create_conversation(self, key: ThreadKey) -> Conversation:
        """The thread's live conversation, created on first use (safe under concurrent first messages)."""
        for _ in range(3):
            async with self.sessions() as session:
                found = await session.scalar(_live(key))
                if found is not None:
                    return found
                now = self.now()
                session.add(conv := Conversation(**_columns(key), created_at=now, updated_at=now))
                try:
                    await session.commit()
                    return conv
                except IntegrityError:
                    await session.rollback()
        raise RuntimeError(f"could not create a conversation for {_columns(key)}")

    async def archive_conversation(self, conversation_id: int) -> None:
        async with self.sessions.begin() as session:
            await session.execute(
                update(Conversation).where(Conversation.id == conversation_id).values(archived_at=self.now())
            )

    async def set_preset(self, conversation_id: int, preset: str | None) -> None:
        async with self.sessions.begin() as session:
            await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id)
                .values(preset=preset, updated_at=self.now())
            )

    async def turns(self, conversation_id: int) -> list[Turn]:
        async with self.sessions() as session:
            rows = await session.scalars(select(Turn).where(Turn.conversation_id == conversation_id).order_by(Turn.seq))
            return list(rows)

    async def get_conversation(self, conversation_id: int) -> Conversation | None:
        async with self.sessions() as session:
            return await session.get(Conversation, conversation_id)

    async def list_conversations(
        self, platform: str | None = None, workspace: str | None = None, limit: int = 50
    ) -> list[tuple[Conversation, int]]:
        """Most recently updated conversations with their turn counts."""
        async with self.sessions() as session:
            query = (
                select(Conversation, func.count(Turn.id))
                .outerjoin(Turn, Turn.conversation_id == Conversation.id)
                .group_by(Conversation.id)
                .order_by(Conversation.updated_at.desc())
                .limit(limit)
            )
            if platform:
                query = query.where(Conversation.platform == platform)
            if workspace:
                query = query.where(Conversation.workspace == workspace)
            return [(c, n) for c, n in (await session.execute(query)).all()]

    async def conversation_ids(self) -> list[int]:
        """Every conversation id, archived ones too, oldest first (for exports)."""
        async with self.sessions() as session:
            return list(await session.scalars(select(Conversation.id).order_by(Conversation.id)))

    async def count_conversations_before(self, older_than: datetime) -> int:
        """How many conversations :meth:`purge_conversations` would delete."""
        async with self.sessions() as session:
            query = select(func.count(Conversation.id)).where(Conversation.updated_at < older_than)
            return int(await session.scalar(query) or 0)

    async def purge_conversations(self, older_than: datetime) -> int:
        """Delete conversations (and their turns) not updated since ``older_than``; unreferenced images too.
        Their usage stays in the ledger (unlinked from the deleted turns)."""
        async with self.sessions.begin() as session:
            ids = list(await session.scalars(select(Conversation.id).where(Conversation.updated_at < older_than)))
            if not ids:
                return 0
            await unlink_turns(session, select(Turn.id).where(Turn.conversation_id.in_(ids)))
            await session.execute(delete(Turn).where(Turn.conversation_id.in_(ids)))
            await session.execute(delete(Conversation).where(Conversation.id.in_(ids)))
            used = select(Turn.image_id).where(Turn.image_id.is_not(None))
            await session.execute(delete(ImageBlob).where(ImageBlob.id.not_in(used)))
            await session.execute(delete(FollowedThread).where(FollowedThread.addressed_at < older_than))
            return len(ids)

    async def follow_thread(self, key: ThreadKey) -> None:
        """Remember that the bot was addressed in this thread (insert, or touch the time)."""
        now = self.now()
        async with self.sessions() as session:
            row = await session.get(FollowedThread, (key.platform, key.workspace, key.channel, key.thread))
            if row is not None:
                row.addressed_at = now
                await session.commit()
                return
            session.add(FollowedThread(**_columns(key), addressed_at=now))
            try:
                await session.commit()
            except IntegrityError:  # a concurrent first address: the row is there, which is all we need
                await session.rollback()

    async def is_followed(self, key: ThreadKey) -> bool:
        async with self.sessions() as session:
            pk = (key.platform, key.workspace, key.channel, key.thread)
            return await session.get(FollowedThread, pk) is not None

    # ------------------------------------------------------------------ images and turns

    async def add_image(self, data: bytes, mime: str, width: int, height: int) -> int:
        """Store image bytes once per SHA-256 and return the row id."""
        digest = hashlib.sha256(data).hexdigest()
        for _ in range(3):
            async with self.sessions() as session:
                existing = await session.scalar(select(ImageBlob.id).where(ImageBlob.sha256 == digest))
                if existing is not None:
                    return existing
                blob = ImageBlob(
                    sha256=digest,
                    mime=mime,
                    width=width,
                    height=height,
                    size=len(data),
                    data=data,
                    created_at=self.now(),
                )
                session.add(blob)
                try:
                    await session.commit()
                    return blob.id
                except IntegrityError:
                    await session.rollback()
        raise RuntimeError("could not store image")

    async def image_data(self, ids: Sequence[int]) -> dict[int, bytes]:
        if not ids:
            return {}
        async with self.sessions() as session:
            rows = await session.execute(select(ImageBlob.id, ImageBlob.data).where(ImageBlob.id.in_(list(ids))))
            return {i: d for i, d in rows.all()}

    async def image_info(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """sha256, size, mime, width and height per image id — everything but the bytes."""
        if not ids:
            return {}
        columns = (ImageBlob.sha256, ImageBlob.size, ImageBlob.mime, ImageBlob.width, ImageBlob.height)
        async with self.sessions() as session:
            rows = await session.execute(select(ImageBlob.id, *columns).where(ImageBlob.id.in_(list(set(ids)))))
            return {row.id: {c.key: getattr(row, c.key) for c in columns} for row in rows.all()}

    async def add_turns(
        self, conversation_id: int, turns: Sequence[dict[str, Any]], *, event: tuple[str, str] | None = None
    ) -> list[Turn]:
        """Append turns (dicts of Turn columns) after the last one, atomically.  ``event`` (platform, event
        id): the processed event these turns answer, linked to the last turn in the same transaction, so a
        crash can never leave an answer whose event a retry cannot find (:meth:`~storage.EventStore.mark_event`)."""
        for _ in range(5):
            async with self.sessions() as session:
                try:
                    # Touch the conversation first: that takes its row lock (PostgreSQL) or the write lock
                    # (SQLite), so concurrent appends to one thread queue up and each reads the last seq.
                    now = self.now()
                    await session.execute(
                        update(Conversation).where(Conversation.id == conversation_id).values(updated_at=now)
                    )
                    last = await session.scalar(
                        select(func.max(Turn.seq)).where(Turn.conversation_id == conversation_id)
                    )
                    seq = (last or 0) + 1
                    rows = [
                        Turn(conversation_id=conversation_id, seq=seq + i, created_at=now, updated_at=now, **values)
                        for i, values in enumerate(turns)
                    ]
                    session.add_all(rows)
                    if event is not None:
                        await session.flush()
                        await link_event(session, event, rows[-1].id)
                    await session.commit()
                    return rows
                except IntegrityError:  # should not happen with the lock above; retry to be safe
                    await session.rollback()
        raise RuntimeError("could not append turns")

    async def finish_turn(
        self, turn_id: int, *, usage_id: int | None = None, tokens: int = 0, release: bool = False, **values: Any
    ) -> None:
        """Update an assistant turn (text, status, counts) and, in the same transaction, settle the usage
        reservation its request was admitted with (:meth:`~storage.LedgerStore.admission`): ``tokens`` and the
        turn are written to ledger row ``usage_id``, or the row is deleted with ``release=True`` (the bot failed
        to answer, so the request is not charged).  Idempotent: a retried write sets the same values again."""
        now = self.now()
        async with self.sessions.begin() as session:
            await session.execute(update(Turn).where(Turn.id == turn_id).values(updated_at=now, **values))
            if usage_id is not None:
                await settle_usage(session, usage_id, turn_id, tokens, release=release)

    async def save_partial(self, turn_id: int, text: str) -> bool:
        """Store the text streamed so far of an answer still being written (a cheap UPDATE of one row), so a
        crash keeps it.  Only while the answer is unfinished: a late write never overwrites a final one."""
        async with self.sessions.begin() as session:
            result = await session.execute(
                update(Turn)
                .where(Turn.id == turn_id, Turn.status.in_(("pending", "streaming")))
                .values(text=text, updated_at=self.now())
            )
            return bool(affected(result))


def _live(key: ThreadKey) -> Any:
    return select(Conversation).where(
        Conversation.platform == key.platform,
        Conversation.workspace == key.workspace,
        Conversation.channel == key.channel,
        Conversation.thread == key.thread,
        Conversation.archived_at.is_(None),
    )
