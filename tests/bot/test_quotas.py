"""The quota module (issue 22 item 2) owns what a request costs and the figures shown: the admission, the
``settings`` reply and ``admin quota show`` read the same :meth:`QuotaPolicy.overview` lines."""

from __future__ import annotations

import pytest

from bot.core.config import QuotaLimits, QuotaSettings
from bot.core.errors import QuotaExceeded
from bot.core.quotas import QuotaPolicy, reservation, settlement
from storage import Database, UsageTotals


def test_a_request_reserves_one_request_and_its_pictures_and_no_tokens():
    assert reservation(0) == UsageTotals(requests=1)
    assert reservation(3) == UsageTotals(requests=1, tokens=0, images=3)


def test_the_answer_settles_its_reservation_by_how_it_ended():
    assert settlement(7, "done", streamed=5, completion=9) == {"usage_id": 7, "tokens": 9, "release": False}
    assert settlement(7, "interrupted", streamed=5) == {"usage_id": 7, "tokens": 5, "release": False}  # work done
    assert settlement(7, "failed", streamed=5)["release"] is True  # the bot could not answer: not charged


def test_the_overview_shows_the_figures_the_admission_enforces(run_db):
    quotas = QuotaSettings(user=QuotaLimits(requests_per_day=2, images_per_day=3), workspace=QuotaLimits())

    async def work(db: Database):
        policy = QuotaPolicy(quotas, db)
        await policy.admit("slack", "T1", "alice", 2)
        await policy.admit("slack", "T1", "alice", 0)
        shown = await policy.overview("slack", "T1", "alice")
        with pytest.raises(QuotaExceeded) as refused:
            await policy.admit("slack", "T1", "alice", 0)
        await db.set_quota("user", "slack", "T1", "alice", requests_per_day=5)
        with pytest.raises(QuotaExceeded) as pictures:
            await policy.admit("slack", "T1", "alice", 2)  # 2 + 2 pictures > 3
        return shown, refused.value, pictures.value, await policy.overview("slack", "T1", "alice")

    shown, refused, pictures, later = run_db(work)
    user = {line.name: line for line in shown.scopes[0].lines}
    assert [s.scope for s in shown.scopes] == ["user", "workspace"]
    assert (user["requests_per_day"].effective, user["requests_per_day"].used) == (2, 2)
    assert (refused.limit_name, refused.used, refused.limit) == ("requests_per_day", 2, 2)
    assert (user["images_per_day"].counter, user["images_per_day"].window, user["images_per_day"].used) == (
        "images", "day", 2,
    )  # fmt: skip
    assert (pictures.limit_name, pictures.used, pictures.limit) == ("images_per_day", 2, 3)
    requests = next(line for line in later.scopes[0].lines if line.name == "requests_per_day")
    assert (requests.default, requests.override, requests.effective, requests.used) == (2, 5, 5, 2)
    assert later.scopes[0].overridden and not later.scopes[1].overridden
