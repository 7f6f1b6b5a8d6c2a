"""Bot processes and their heartbeats: which unfinished answers belong to a process that is gone."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.exc import IntegrityError

from storage.base import Store, affected
from storage.tables import Turn, Worker

__all__ = ["WorkerStore"]


class WorkerStore(Store):
    """The workers table, and the one rule it exists for: :meth:`mark_interrupted`."""

    async def register_worker(self, worker_id: str, host: str, pid: int) -> None:
        """Record this process as running (or touch its heartbeat)."""
        now = self.now()
        async with self.sessions() as session:
            row = await session.get(Worker, worker_id)
            if row is None:
                session.add(Worker(id=worker_id, host=host[:255], pid=pid, started_at=now, seen_at=now))
            else:
                row.seen_at = now
            try:
                await session.commit()
            except IntegrityError:  # registered meanwhile by a concurrent heartbeat: that is all we need
                await session.rollback()

    async def remove_worker(self, worker_id: str) -> None:
        """A clean shutdown: this process writes nothing more."""
        async with self.sessions.begin() as session:
            await session.execute(delete(Worker).where(Worker.id == worker_id))

    async def workers(self) -> list[Worker]:
        async with self.sessions() as session:
            return list(await session.scalars(select(Worker).order_by(Worker.started_at)))

    async def mark_interrupted(self, *, live_since: datetime | None = None, dead: Sequence[str] = ()) -> int:
        """Answers left ``pending``/``streaming`` by a process that is gone become ``interrupted`` (kept, not
        deleted, with the text :meth:`~storage.ConversationStore.save_partial` stored while they streamed).
        Without ``live_since``: every unfinished answer (one process, at its start).  With it: only
        those of processes whose heartbeat is older than ``live_since``, listed in ``dead`` or unknown (no
        worker recorded, or its row pruned) — and the rows of workers not seen since ``live_since`` are pruned.
        A caller that has just touched its own row (:meth:`register_worker`) is alive by that rule."""
        unfinished: ColumnElement[bool] = Turn.status.in_(("pending", "streaming"))
        async with self.sessions.begin() as session:
            if live_since is not None:
                await session.execute(delete(Worker).where(Worker.seen_at < live_since))
                alive = select(Worker.id).where(Worker.id.not_in(list(dead)))
                unfinished = unfinished & (Turn.worker.is_(None) | Turn.worker.not_in(alive))
            result = await session.execute(
                update(Turn)
                .where(unfinished)
                .values(status="interrupted", finish_reason="interrupted", updated_at=self.now())
                .execution_options(synchronize_session=False)
            )
            return affected(result)
