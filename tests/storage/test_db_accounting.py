"""``storage.Database`` accounting on SQLite and on a real PostgreSQL: usage windows and reports, quotas, access
rules, and the purge and export helpers (conversations, turns and images: test_db.py)."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from db_helpers import KEY, NOW, reserve, usage
from sqlalchemy import select, update

from bot.core.requests import ThreadRef
from storage import Database, UsageTotals
from storage.tables import Conversation, ImageBlob, Turn, UsageEntry


async def _age_conversation(db: Database, conversation_id: int, when: datetime) -> None:
    async with db.sessions.begin() as session:
        await session.execute(update(Conversation).where(Conversation.id == conversation_id).values(updated_at=when))


# ---------------------------------------------------------------------- usage


def test_usage_since_sums_a_window_per_user_and_per_workspace(run_db):
    async def body(db: Database):
        await db.record_usage(**usage("U1", tokens=100, images=1, at=NOW - timedelta(days=40)))
        await db.record_usage(**usage("U1", tokens=10, images=1, at=NOW - timedelta(days=3)))
        await db.record_usage(**usage("U1", tokens=20, at=NOW - timedelta(hours=2)))
        await db.record_usage(**usage("U2", tokens=5, requests=2, at=NOW - timedelta(minutes=5)))
        await db.record_usage(**usage("U1", workspace="T2", tokens=1000))
        await db.record_usage(**usage("U1", platform="discord", tokens=7000))
        day = NOW - timedelta(days=1)
        month = NOW - timedelta(days=30)
        return (
            await db.usage_since("slack", "T1", "U1", day),
            await db.usage_since("slack", "T1", "U1", month),
            await db.usage_since("slack", "T1", None, day),
            await db.usage_since("slack", "T1", None, NOW - timedelta(days=365)),
            await db.usage_since("slack", "T9", "U1", month),
            await db.usage_since("slack", "T1", "U1", NOW + timedelta(minutes=1)),
            await db.usage_windows("slack", "T1", "U1", {"day": day, "month": month, "future": NOW + timedelta(1)}),
        )

    u1_day, u1_month, ws_day, ws_year, nobody, future, windows = run_db(body)
    assert windows == {"day": u1_day, "month": u1_month, "future": UsageTotals()}  # one query, the same sums
    assert u1_day == UsageTotals(requests=1, tokens=20, images=0)
    assert u1_month == UsageTotals(requests=2, tokens=30, images=1)
    assert ws_day == UsageTotals(requests=3, tokens=25, images=0)
    assert ws_year == UsageTotals(requests=5, tokens=135, images=2)
    assert nobody == UsageTotals() == future
    assert isinstance(u1_day.tokens, int)


def test_usage_report_by_user_and_by_day(run_db):
    # 23:30 and 00:30 UTC straddle midnight; the test server runs far from UTC, so buckets must be UTC days.
    late = datetime(2025, 3, 10, 23, 30, tzinfo=UTC)
    early = datetime(2025, 3, 11, 0, 30, tzinfo=UTC)
    since = datetime(2025, 3, 1, tzinfo=UTC)

    async def body(db: Database):
        await db.record_usage(**usage("U1", tokens=10, images=1, at=late))
        await db.record_usage(**usage("U1", tokens=30, at=early))
        await db.record_usage(**usage("U2", tokens=50, requests=3, at=early))
        await db.record_usage(**usage("U3", workspace="T2", tokens=5, at=early))
        await db.record_usage(**usage("U4", platform="discord", workspace="G", tokens=1, at=early))
        await db.record_usage(**usage("U1", tokens=999, at=datetime(2025, 2, 1, tzinfo=UTC)))  # before `since`
        return (
            await db.usage_report(since),
            await db.usage_report(since, by_day=True),
            await db.usage_report(since, platform="slack", workspace="T1"),
            await db.usage_report(since, platform="discord"),
        )

    by_user, by_day, t1, discord = run_db(body)
    assert [(r["user_id"], r["requests"], r["tokens"], r["images"]) for r in by_user] == [
        ("U2", 3, 50, 0),
        ("U1", 2, 40, 1),
        ("U3", 1, 5, 0),
        ("U4", 1, 1, 0),
    ]
    assert [(r["day"], r["user_id"], r["tokens"]) for r in by_day] == [
        ("2025-03-11", "U2", 50),
        ("2025-03-11", "U1", 30),
        ("2025-03-11", "U3", 5),
        ("2025-03-11", "U4", 1),
        ("2025-03-10", "U1", 10),
    ]
    assert {r["user_id"] for r in t1} == {"U1", "U2"}
    assert all(r["workspace"] == "T1" and r["platform"] == "slack" for r in t1)
    assert [(r["user_id"], r["workspace"]) for r in discord] == [("U4", "G")]


# ---------------------------------------------------------------------- quotas


def test_quotas_set_update_reset_and_list(run_db):
    async def body(db: Database):
        assert await db.quota_setting("user", "slack", "T1", "U1") is None
        await db.set_quota("user", "slack", "T1", "U1", requests_per_day=10, tokens_per_month=5000)
        await db.set_quota("user", "slack", "T1", "U1", requests_per_day=20, images_per_day=0)  # partial update
        await db.set_quota("workspace", "slack", "T1", tokens_per_day=100000)
        user = await db.quota_setting("user", "slack", "T1", "U1")
        workspace = await db.quota_setting("workspace", "slack", "T1")
        other = await db.quota_setting("user", "slack", "T2", "U1")
        await db.set_quota("user", "slack", "T1", "U1", tokens_per_month=None)  # back to the default
        cleared = await db.quota_setting("user", "slack", "T1", "U1")
        with pytest.raises(ValueError, match="unknown quota field"):
            await db.set_quota("user", "slack", "T1", "U1", requests_per_year=1)
        listed = await db.list_quotas()
        removed = await db.reset_quota("user", "slack", "T1", "U1")
        removed_again = await db.reset_quota("user", "slack", "T1", "U1")
        return user, workspace, other, cleared, listed, removed, removed_again, await db.list_quotas()

    user, workspace, other, cleared, listed, removed, removed_again, after = run_db(body)
    assert (user.requests_per_day, user.tokens_per_month, user.images_per_day, user.tokens_per_day) == (
        20,
        5000,
        0,
        None,
    )
    assert workspace.scope == "workspace" and workspace.user_id == "" and workspace.tokens_per_day == 100000
    assert other is None
    assert cleared.tokens_per_month is None and cleared.requests_per_day == 20
    assert [(q.scope, q.user_id) for q in listed] == [("user", "U1"), ("workspace", "")]
    assert (removed, removed_again) == (True, False)
    assert [q.scope for q in after] == ["workspace"]


# ---------------------------------------------------------------------- access rules


def test_access_rules_add_remove_and_duplicates(run_db):
    async def body(db: Database):
        assert await db.add_rule("deny", "user", "slack", "U666", note="spam") is True
        assert await db.add_rule("deny", "user", "slack", "U666") is False  # duplicate
        assert await db.add_rule("allow", "user", "slack", "U666") is True  # allow and deny are separate rules
        assert await db.add_rule("allow", "channel", "slack", "C1") is True
        assert await db.add_rule("allow", "workspace", "discord", "G1") is True
        with pytest.raises(ValueError):
            await db.add_rule("maybe", "user", "slack", "U1")
        with pytest.raises(ValueError):
            await db.add_rule("allow", "team", "slack", "U1")
        everything = await db.rules()
        slack = await db.rules("slack")
        removed = await db.remove_rule("allow", "user", "slack", "U666")
        removed_again = await db.remove_rule("allow", "user", "slack", "U666")
        return everything, slack, removed, removed_again, await db.rules()

    everything, slack, removed, removed_again, after = run_db(body)
    assert [(r.action, r.target, r.value) for r in everything] == [
        ("allow", "channel", "C1"),
        ("allow", "user", "U666"),
        ("allow", "workspace", "G1"),
        ("deny", "user", "U666"),
    ]
    assert next(r for r in everything if r.action == "deny").note == "spam"
    assert {r.platform for r in slack} == {"slack"} and len(slack) == 3
    assert (removed, removed_again) == (True, False)
    assert len(after) == 3 and ("allow", "user") not in {(r.action, r.target) for r in after}


def test_concurrent_duplicate_rules_are_added_once(run_db):
    async def body(db: Database):
        results = await asyncio.gather(*(db.add_rule("deny", "channel", "slack", "C1") for _ in range(8)))
        return results, await db.rules()

    results, rules = run_db(body)
    assert results.count(True) == 1 and len(rules) == 1


# ---------------------------------------------------------------------- purge


def test_purge_removes_old_conversations_turns_and_orphan_images_but_keeps_usage(run_db):
    async def body(db: Database):
        old = await db.get_or_create_conversation(KEY)
        kept = await db.get_or_create_conversation(ThreadRef("slack", "T1", "C1", "recent"))
        shared = await db.add_image(b"shared", "image/png", 1, 1)
        only_old = await db.add_image(b"only-old", "image/png", 1, 1)
        _q, old_answer = await db.add_turns(
            old.id, [{"role": "user", "image_id": only_old}, {"role": "assistant", "status": "streaming"}]
        )
        await db.add_turns(old.id, [{"role": "user", "image_id": shared}])
        await db.finish_turn(old_answer.id, usage_id=await reserve(db), tokens=77, text="a", status="done")
        _q2, new_answer = await db.add_turns(
            kept.id, [{"role": "user", "image_id": shared}, {"role": "assistant", "status": "streaming"}]
        )
        await db.finish_turn(new_answer.id, usage_id=await reserve(db), tokens=5, text="b", status="done")
        await _age_conversation(db, old.id, NOW - timedelta(days=100))

        cutoff = NOW - timedelta(days=30)
        purged = await db.purge_conversations(cutoff)
        purged_again = await db.purge_conversations(cutoff)
        async with db.sessions() as session:
            images = set(await session.scalars(select(ImageBlob.id)))
            ledger = {e.tokens: e.turn_id for e in await session.scalars(select(UsageEntry))}
            all_turns = list(await session.scalars(select(Turn.conversation_id)))
        return (
            purged,
            purged_again,
            await db.get_conversation(old.id),
            await db.get_conversation(kept.id),
            images,
            ledger,
            all_turns,
            (shared, only_old, new_answer.id, kept.id),
            await db.usage_since("slack", "T1", "U1", NOW - timedelta(days=1)),
        )

    purged, again, old, kept, images, ledger, all_turns, ids, totals = run_db(body)
    shared, _only_old, new_answer_id, kept_id = ids
    assert (purged, again) == (1, 0)
    assert old is None and kept is not None
    assert images == {shared}
    assert ledger == {77: None, 5: new_answer_id}  # usage history survives, detached from the deleted turn
    assert set(all_turns) == {kept_id} and len(all_turns) == 2
    assert totals.tokens == 82


def test_export_helpers_ids_counts_and_image_info(run_db):
    async def body(db: Database):
        a = await db.get_or_create_conversation(KEY)
        b = await db.get_or_create_conversation(ThreadRef("web", "local", "browser", "s1"))
        await db.archive_conversation(a.id)
        image = await db.add_image(b"abc", "image/jpeg", 3, 2)
        await _age_conversation(db, a.id, NOW - timedelta(days=10))
        return (
            (a.id, b.id, image),
            await db.conversation_ids(),
            await db.count_conversations_before(NOW - timedelta(days=5)),
            await db.count_conversations_before(NOW - timedelta(days=20)),
            await db.count_conversations_before(db.now() + timedelta(seconds=1)),
            await db.image_info([image, image, 4242]),
            await db.image_info([]),
        )

    (a, b, image), ids, five, twenty, everything, info, empty = run_db(body)
    assert ids == [a, b]  # archived ones too, oldest first
    assert (five, twenty, everything) == (1, 0, 2)
    assert info == {
        image: {"sha256": hashlib.sha256(b"abc").hexdigest(), "size": 3, "mime": "image/jpeg", "width": 3, "height": 2}
    }
    assert empty == {}
