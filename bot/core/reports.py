"""Admin reports: what ``minigpt4-bot admin`` shows, assembled from storage by the core's own rules.

The commands only render these.  Quota figures are not here: :meth:`bot.core.quotas.QuotaPolicy.overview`
gives them, from the rules the bot enforces.  Every "today", "this month" and "N days ago" is
measured on the database's clock (:meth:`storage.Database.now`), as the bot measures them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from bot.core.quotas import COUNTER_NAMES, day_start
from storage import Database, as_utc
from storage.tables import Conversation, Turn

__all__ = [
    "ConversationRecord",
    "UsageReport",
    "conversation_document",
    "load_conversation",
    "purge_candidates",
    "usage_report",
]

# ---------------------------------------------------------------------------- usage


@dataclass(frozen=True)
class UsageReport:
    since: datetime  # start of the first day counted (UTC)
    columns: tuple[str, ...]  # platform, workspace, user_id, [day,] requests, tokens, images
    rows: list[dict[str, Any]]  # largest token users first; the counters are ints


async def usage_report(
    db: Database,
    *,
    days: int,
    platform: str | None = None,
    workspace: str | None = None,
    by_day: bool = False,
    top: int | None = None,
) -> UsageReport:
    """Requests, tokens and images per user over the last ``days`` UTC days (today included).

    ``top``: only the users with the most tokens in the whole period (all their rows when ``by_day``).
    """
    since = day_start(db.now()) - timedelta(days=days - 1)
    found = await db.usage_report(since, platform=platform, workspace=workspace, by_day=by_day)
    rows: list[dict[str, Any]] = [{k: int(v) if k in COUNTER_NAMES else v for k, v in row.items()} for row in found]
    if top is not None:
        totals: dict[tuple[str, str, str], int] = {}
        for r in rows:
            key = (r["platform"], r["workspace"], r["user_id"])
            totals[key] = totals.get(key, 0) + r["tokens"]
        keep = set(sorted(totals, key=lambda k: (-totals[k], k))[:top])
        rows = [r for r in rows if (r["platform"], r["workspace"], r["user_id"]) in keep]
    columns = ("platform", "workspace", "user_id", *(("day",) if by_day else ()), *COUNTER_NAMES)
    return UsageReport(since, columns, [{c: r[c] for c in columns} for r in rows])


# ---------------------------------------------------------------------------- conversations


@dataclass(frozen=True)
class ConversationRecord:
    """A stored conversation, its turns in order, and what is known about its pictures (never the bytes)."""

    conversation: Conversation
    turns: list[Turn]
    images: dict[int, dict[str, Any]]  # image id -> sha256, size, mime, width, height

    def image(self, turn: Turn) -> dict[str, Any] | None:
        return self.images.get(turn.image_id) if turn.image_id is not None else None


async def load_conversation(db: Database, conversation_id: int) -> ConversationRecord | None:
    conversation = await db.get_conversation(conversation_id)
    if conversation is None:
        return None
    turns = await db.turns(conversation_id)
    images = await db.image_info([t.image_id for t in turns if t.image_id is not None])
    return ConversationRecord(conversation, turns, images)


def _iso(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value is not None else None


def _document(record: ConversationRecord) -> dict[str, Any]:
    conv = record.conversation
    return {
        "id": conv.id,
        "platform": conv.platform,
        "workspace": conv.workspace,
        "channel": conv.channel,
        "thread": conv.thread,
        "preset": conv.preset,
        "created_at": _iso(conv.created_at),
        "updated_at": _iso(conv.updated_at),
        "archived_at": _iso(conv.archived_at),
        "turns": [
            {
                "seq": t.seq,
                "role": t.role,
                "user_id": t.user_id,
                "text": t.text,
                "image": record.image(t),
                "status": t.status,
                "finish_reason": t.finish_reason,
                "error": t.error,
                "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens,
                "ttft_ms": t.ttft_ms,
                "duration_ms": t.duration_ms,
                "created_at": _iso(t.created_at),
            }
            for t in record.turns
        ],
    }


async def conversation_document(db: Database, conversation_id: int) -> dict[str, Any] | None:
    """The export format: one conversation with every turn in full, as JSON-ready values (``None``: no such id).

    Times are ISO 8601 in UTC; a picture appears as its sha256, size, type and pixel size, never its bytes.
    """
    record = await load_conversation(db, conversation_id)
    return _document(record) if record is not None else None


async def purge_candidates(db: Database, older_than_days: int) -> tuple[datetime, int]:
    """The purge cutoff (``older_than_days`` before now) and how many conversations were inactive since."""
    cutoff = db.now() - timedelta(days=older_than_days)
    return cutoff, await db.count_conversations_before(cutoff)
