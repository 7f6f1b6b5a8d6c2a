"""One clock: quotas, the usage ledger, reports, purges and event pruning all read the database's clock.

The production clock (wall-clock UTC) is moved with ``time-machine`` across a day, a month and a
year boundary, on SQLite and a real PostgreSQL, so nothing here depends on the date the suite runs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine

from bot.core.config import Settings
from bot.core.service import BotService
from storage import Database
from tests.bot.test_service import ScriptedBackend, png, req

BOUNDARIES = {
    # last minute before the boundary → first minute after it; which windows reset
    "day": (datetime(2026, 3, 17, 23, 59, 30, tzinfo=UTC), datetime(2026, 3, 18, 0, 0, 30, tzinfo=UTC)),
    "month": (datetime(2026, 4, 30, 23, 59, 30, tzinfo=UTC), datetime(2026, 5, 1, 0, 0, 30, tzinfo=UTC)),
    "year": (datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC), datetime(2027, 1, 1, 0, 0, 30, tzinfo=UTC)),
}


def _service(db: Database, quotas: dict[str, Any]) -> BotService:
    return BotService(Settings.model_validate({"quotas": {"user": quotas}}), db, ScriptedBackend())


async def _ask(service: BotService, text: str, *images: bytes, user: str = "alice", thread: str = "t1") -> Any:
    return [e async for e in service.handle(req(text, *images, user=user, thread=thread))][-1]


@pytest.mark.parametrize("boundary", sorted(BOUNDARIES))
def test_daily_quota_resets_across_the_boundary(run_db: Any, boundary: str) -> None:
    before, after = BOUNDARIES[boundary]

    async def main(db: Database) -> None:  # the production clock, moved by time-machine
        service = _service(db, {"requests_per_day": 2, "images_per_day": 0})
        with time_machine.travel(before, tick=False):
            assert (await _ask(service, "one", png())).kind == "answer"
            assert (await _ask(service, "two")).kind == "answer"
            refused = await _ask(service, "three")
            assert refused.kind == "error" and "limit of 2 requests per day" in refused.text
            assert f"{after:%Y-%m-%d} 00:00 UTC" in refused.text  # the reset time is the next UTC midnight
        with time_machine.travel(after, tick=False):
            assert (await _ask(service, "three")).kind == "answer"
            assert (await db.usage_since("slack", "T1", "alice", after.replace(minute=0, second=0))).requests == 1

    run_db(main)


@pytest.mark.parametrize("boundary", sorted(BOUNDARIES))
def test_monthly_quota_resets_only_at_a_new_month(run_db: Any, boundary: str) -> None:
    before, after = BOUNDARIES[boundary]
    resets = after.month != before.month

    async def main(db: Database) -> None:
        service = _service(db, {"requests_per_month": 1, "requests_per_day": 0, "images_per_day": 0})
        with time_machine.travel(before, tick=False):
            assert (await _ask(service, "one", png())).kind == "answer"
            refused = await _ask(service, "two")
            assert "limit of 1 requests per month" in refused.text
            next_month = (before.replace(day=1) + timedelta(days=32)).replace(day=1)
            assert f"{next_month:%Y-%m-%d} 00:00 UTC" in refused.text
        with time_machine.travel(after, tick=False):
            again = await _ask(service, "two")
            assert again.kind == ("answer" if resets else "error"), (boundary, again.text)

    run_db(main)


def test_every_stored_timestamp_comes_from_the_database_clock(run_db: Any) -> None:
    """An injected clock far from the real date stamps every row; the report groups by that clock's days."""
    fake = datetime(2031, 2, 28, 23, 0, tzinfo=UTC)

    async def main(db: Database) -> None:
        service = _service(db, {"requests_per_day": 0, "images_per_day": 0})
        assert (await _ask(service, "one", png())).kind == "answer"
        await db.add_rule("allow", "user", "slack", "alice")
        await db.set_quota("user", "slack", "T1", "alice", tokens_per_day=99)
        assert await db.mark_event("slack", "ev1")
        (conv,) = [c for c, _ in await db.list_conversations()]
        stamps = [conv.created_at, conv.updated_at]
        for turn in await db.turns(conv.id):
            stamps += [turn.created_at, turn.updated_at]
        stamps += [r.created_at for r in await db.rules()] + [q.updated_at for q in await db.list_quotas()]
        assert stamps and {s.replace(tzinfo=UTC) if s.tzinfo is None else s for s in stamps} == {fake}
        (row,) = await db.usage_report(fake - timedelta(days=1), by_day=True)
        assert row["day"] == "2031-02-28"
        # Pruning and purging compare against the same clock: nothing is older than "now" yet.
        assert await service.prune_events() == 0
        assert await db.count_conversations_before(fake) == 0
        assert await db.count_conversations_before(fake + timedelta(seconds=1)) == 1

    run_db(main, clock=lambda: fake)


def test_event_ids_are_pruned_after_the_retention_period(run_db: Any) -> None:
    start = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

    async def main(db: Database) -> None:
        settings = Settings.model_validate({"database": {"event_retention_days": 3}})
        service = BotService(settings, db, ScriptedBackend())
        with time_machine.travel(start, tick=False):
            assert await db.mark_event("slack", "old")
        with time_machine.travel(start + timedelta(days=2), tick=False):
            assert await db.mark_event("slack", "new")
            assert await service.prune_events() == 0
            assert not await db.mark_event("slack", "old")  # still remembered: a redelivery is dropped
        with time_machine.travel(start + timedelta(days=3, seconds=1), tick=False):
            assert await service.prune_events() == 1
            assert await db.mark_event("slack", "old")  # forgotten after the retention period
            assert not await db.mark_event("slack", "new")

    run_db(main)
