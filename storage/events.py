"""Processed platform events: the store that makes a redelivered event a duplicate (and a failed one a retry)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from storage.base import Store, affected
from storage.tables import ProcessedEvent, Turn

__all__ = ["EventStore", "link_event"]


class EventStore(Store):
    """Event ids already handled, each linked to the answer it got once that answer is stored."""

    async def mark_event(self, platform: str, event_id: str) -> bool:
        """Record a platform event id; ``False`` if it was seen before (a retry or redelivery) — unless the
        answer it got failed or was interrupted (a crash, the user left): that event is claimed again, so a
        retry is answered.  An event still being answered, or answered, stays a duplicate."""
        try:
            async with self.sessions.begin() as session:
                session.add(ProcessedEvent(platform=platform, event_id=event_id, received_at=self.now()))
        except IntegrityError:
            return await self._retake_event(platform, event_id)
        return True

    async def _retake_event(self, platform: str, event_id: str) -> bool:
        """Claim a seen event whose answer failed or was interrupted, in one transaction that first takes the
        event's row (a conditional UPDATE: of simultaneous retries exactly one wins, the others find the link
        cleared), then clears the link and marks the earlier attempt's user turns ``retried``: kept, but left
        out of what the model sees, so the retried message is not in the thread twice.  No link: refused
        before an answer, or being answered and not stored yet — a duplicate."""
        key = (ProcessedEvent.platform == platform, ProcessedEvent.event_id == event_id)
        ended = select(Turn.id).where(Turn.status.in_(("failed", "interrupted")))
        async with self.sessions.begin() as session:
            claim = update(ProcessedEvent).where(*key, ProcessedEvent.turn_id.in_(ended))
            if not affected(await session.execute(claim.values(received_at=self.now()))):
                return False
            answer = await session.get(Turn, await session.scalar(select(ProcessedEvent.turn_id).where(*key)))
            await session.execute(update(ProcessedEvent).where(*key).values(turn_id=None))
            if answer is not None:
                await session.execute(_attempt_questions(answer).values(status="retried", updated_at=self.now()))
            return True

    async def forget_event(self, platform: str, event_id: str) -> bool:
        """Give back an event id whose request was refused before anything was stored (no answer linked), so
        that the same id sent again is answered; ``False`` if there was no such row."""
        async with self.sessions.begin() as session:
            key = (ProcessedEvent.platform == platform, ProcessedEvent.event_id == event_id)
            row = delete(ProcessedEvent).where(*key, ProcessedEvent.turn_id.is_(None))
            return bool(affected(await session.execute(row)))

    async def event_seen(self, platform: str, event_id: str) -> bool:
        """Whether :meth:`mark_event` would refuse the event now (a read: nothing recorded) — for a front end
        that asks before fetching what a request needs.  An event whose answer failed or was interrupted is
        not seen: its retry will be answered."""
        query = (
            select(Turn.status)
            .select_from(ProcessedEvent)
            .outerjoin(Turn, Turn.id == ProcessedEvent.turn_id)
            .where(ProcessedEvent.platform == platform, ProcessedEvent.event_id == event_id)
        )
        async with self.sessions() as session:
            found = (await session.execute(query)).first()
        return found is not None and found.status not in ("failed", "interrupted")

    async def prune_events(self, older_than: datetime) -> int:
        async with self.sessions.begin() as session:
            old = delete(ProcessedEvent).where(ProcessedEvent.received_at < older_than)
            return affected(await session.execute(old))


async def link_event(session: Any, event: tuple[str, str], turn_id: int) -> None:
    """Inside an answer's write (:meth:`storage.ConversationStore.add_turns`): the event (platform, event id)
    was answered by ``turn_id``, so a retry of it can find out how that answer ended."""
    await session.execute(
        update(ProcessedEvent)
        .where(ProcessedEvent.platform == event[0], ProcessedEvent.event_id == event[1])
        .values(turn_id=turn_id)
    )


def _attempt_questions(answer: Turn) -> Any:
    """An UPDATE of the user turns that asked for ``answer``: those after the answer before it."""
    in_thread = Turn.conversation_id == answer.conversation_id
    before = select(func.coalesce(func.max(Turn.seq), 0)).where(
        in_thread, Turn.role == "assistant", Turn.seq < answer.seq
    )
    return update(Turn).where(
        in_thread, Turn.role == "user", Turn.seq < answer.seq, Turn.seq > before.scalar_subquery()
    )
