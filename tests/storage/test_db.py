"""Every ``storage.Database`` method on SQLite and on a real PostgreSQL, including concurrent callers."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from bot.core.requests import ThreadRef
from storage import Database, UsageTotals, as_utc
from storage.tables import Conversation, ImageBlob, Turn, UsageEntry, Worker

KEY = ThreadRef("slack", "T1", "C1", "1700000000.0001")
NOW = datetime.now(UTC)  # only ever compared relative to itself


def usage(user: str = "U1", workspace: str = "T1", platform: str = "slack", **values):
    return {"platform": platform, "workspace": workspace, "user_id": user, **values}


async def reserve(db: Database, user: str = "U1", workspace: str = "T1", images: int = 0) -> int:
    """A request's usage reservation, admitted with no quota check."""
    async with db.admission("slack", workspace, user, UsageTotals(requests=1, images=images)) as admission:
        pass
    return admission.usage_id


async def _age_conversation(db: Database, conversation_id: int, when: datetime) -> None:
    async with db.sessions.begin() as session:
        await session.execute(update(Conversation).where(Conversation.id == conversation_id).values(updated_at=when))


# ---------------------------------------------------------------------- events


def test_mark_event_dedups_and_prunes(run_db):
    async def body(db: Database):
        assert await db.mark_event("slack", "Ev1") is True
        assert await db.mark_event("slack", "Ev1") is False
        assert await db.mark_event("discord", "Ev1") is True  # ids are per platform
        assert await db.prune_events(db.now() - timedelta(hours=1)) == 0
        assert await db.prune_events(db.now() + timedelta(seconds=1)) == 2
        assert await db.mark_event("slack", "Ev1") is True  # pruned: seen as new again

    run_db(body)


def test_concurrent_duplicate_events_exactly_one_wins(run_db):
    async def body(db: Database):
        results = await asyncio.gather(*(db.mark_event("slack", "Ev-dup") for _ in range(12)))
        others = await asyncio.gather(*(db.mark_event("slack", f"Ev-{i}") for i in range(6)))
        return results, others

    results, others = run_db(body)
    assert results.count(True) == 1
    assert results.count(False) == 11
    assert all(others)


# ---------------------------------------------------------------------- conversations


def test_get_or_create_returns_the_same_live_conversation(run_db):
    async def body(db: Database):
        assert await db.live_conversation(KEY) is None
        first = await db.get_or_create_conversation(KEY)
        again = await db.get_or_create_conversation(KEY)
        other = await db.get_or_create_conversation(ThreadRef("slack", "T1", "C1", "other-thread"))
        live = await db.live_conversation(KEY)
        fetched = await db.get_conversation(first.id)
        missing = await db.get_conversation(first.id + 1000)
        return first, again, other, live, fetched, missing

    first, again, other, live, fetched, missing = run_db(body)
    assert first.id == again.id == live.id == fetched.id
    assert other.id != first.id
    assert (fetched.platform, fetched.workspace, fetched.channel, fetched.thread) == (
        "slack",
        "T1",
        "C1",
        "1700000000.0001",
    )
    assert fetched.archived_at is None and fetched.preset is None
    assert missing is None


def test_concurrent_first_messages_create_one_conversation(run_db):
    async def body(db: Database):
        convs = await asyncio.gather(*(db.get_or_create_conversation(KEY) for _ in range(10)))
        listed = await db.list_conversations()
        return convs, listed

    convs, listed = run_db(body)
    assert len({c.id for c in convs}) == 1
    assert len(listed) == 1


def test_archive_then_a_new_live_conversation_for_the_same_thread(run_db):
    async def body(db: Database):
        old = await db.get_or_create_conversation(KEY)
        await db.add_turns(old.id, [{"role": "user", "text": "hello"}])
        await db.archive_conversation(old.id)
        assert await db.live_conversation(KEY) is None
        new = await db.get_or_create_conversation(KEY)
        archived = await db.get_conversation(old.id)
        # a second archive + create works too: the unique index only covers live rows
        await db.archive_conversation(new.id)
        third = await db.get_or_create_conversation(KEY)
        return old, new, archived, third, await db.turns(new.id), await db.turns(old.id)

    old, new, archived, third, new_turns, old_turns = run_db(body)
    assert new.id != old.id and third.id not in (old.id, new.id)
    assert archived.archived_at is not None
    assert as_utc(archived.archived_at) <= datetime.now(UTC)  # the default clock is wall-clock UTC
    assert new.archived_at is None
    assert new_turns == [] and [t.text for t in old_turns] == ["hello"]


def test_two_live_conversations_for_one_thread_are_refused_by_the_schema(run_db):
    async def body(db: Database):
        await db.get_or_create_conversation(KEY)
        async with db.sessions() as session:
            session.add(Conversation(**KEY.__dict__))
            with pytest.raises(IntegrityError):
                await session.commit()

    run_db(body)


def test_set_preset_and_list_conversations_with_turn_counts(run_db):
    async def body(db: Database):
        a = await db.get_or_create_conversation(KEY)
        b = await db.get_or_create_conversation(ThreadRef("discord", "G1", "C9", "m1"))
        await db.set_preset(a.id, "recipe")
        await db.add_turns(b.id, [{"role": "user", "text": "q"}, {"role": "assistant", "text": "a"}])
        return (
            await db.get_conversation(a.id),
            await db.list_conversations(),
            await db.list_conversations(platform="slack"),
            await db.list_conversations(workspace="G1"),
            await db.list_conversations(limit=1),
        )

    a, everything, slack, g1, one = run_db(body)
    assert a.preset == "recipe"
    assert [(c.platform, n) for c, n in everything] == [("discord", 2), ("slack", 0)]  # most recently updated first
    assert [c.id for c, _ in slack] == [a.id]
    assert [c.workspace for c, _ in g1] == ["G1"]
    assert len(one) == 1


# ---------------------------------------------------------------------- images and turns


def test_images_are_stored_once_per_hash(run_db):
    png = b"\x89PNG fake image bytes"
    jpeg = b"\xff\xd8 other bytes"

    async def body(db: Database):
        first = await db.add_image(png, "image/png", 10, 20)
        again = await db.add_image(png, "image/png", 10, 20)
        concurrent = await asyncio.gather(*(db.add_image(jpeg, "image/jpeg", 4, 4) for _ in range(8)))
        data = await db.image_data([first, concurrent[0], 99999])
        async with db.sessions() as session:
            rows = list(await session.scalars(select(ImageBlob).order_by(ImageBlob.id)))
        return first, again, concurrent, data, rows, await db.image_data([])

    first, again, concurrent, data, rows, empty = run_db(body)
    assert first == again
    assert len(set(concurrent)) == 1 and concurrent[0] != first
    assert data == {first: png, concurrent[0]: jpeg}
    assert [r.sha256 for r in rows] == [hashlib.sha256(png).hexdigest(), hashlib.sha256(jpeg).hexdigest()]
    assert (rows[0].size, rows[0].width, rows[0].height, rows[0].mime) == (len(png), 10, 20, "image/png")
    assert empty == {}


def test_turns_are_appended_in_order(run_db):
    async def body(db: Database):
        conv = await db.get_or_create_conversation(KEY)
        image = await db.add_image(b"img", "image/png", 1, 1)
        first = await db.add_turns(
            conv.id,
            [
                {"role": "user", "text": "what is this?", "image_id": image, "user_id": "U1"},
                {"role": "assistant", "text": "", "status": "pending"},
            ],
        )
        second = await db.add_turns(conv.id, [{"role": "user", "text": "and now?", "user_id": "U1"}])
        return first, second, await db.turns(conv.id)

    first, second, turns = run_db(body)
    assert [t.seq for t in first] == [1, 2] and [t.seq for t in second] == [3]
    assert [(t.seq, t.role, t.text) for t in turns] == [
        (1, "user", "what is this?"),
        (2, "assistant", ""),
        (3, "user", "and now?"),
    ]
    assert turns[0].image_id is not None and turns[1].image_id is None
    assert turns[1].status == "pending" and turns[0].status == "done"  # the column default
    assert turns[0].prompt_tokens == 0 and turns[0].user_id == "U1"


def test_concurrent_appends_get_distinct_consecutive_seqs(run_db):
    async def body(db: Database):
        conv = await db.get_or_create_conversation(KEY)
        other = await db.get_or_create_conversation(ThreadRef("slack", "T1", "C1", "parallel"))
        batches = await asyncio.gather(
            *(
                db.add_turns(conv.id, [{"role": "user", "text": f"q{i}"}, {"role": "assistant", "text": f"a{i}"}])
                for i in range(10)
            ),
            *(db.add_turns(other.id, [{"role": "user", "text": f"x{i}"}]) for i in range(5)),
        )
        return batches, await db.turns(conv.id), await db.turns(other.id)

    batches, turns, other_turns = run_db(body)
    assert [t.seq for t in turns] == list(range(1, 21))
    for batch in batches[:10]:  # each call's turns stay adjacent: user then its assistant
        assert batch[1].seq == batch[0].seq + 1
        assert batch[0].text[1:] == batch[1].text[1:]
    by_seq = {t.seq: t.text for t in turns}
    for seq in range(1, 21, 2):
        assert by_seq[seq].startswith("q") and by_seq[seq + 1] == "a" + by_seq[seq][1:]
    assert [t.seq for t in other_turns] == [1, 2, 3, 4, 5]


def test_finish_turn_settles_its_usage_reservation_in_the_same_transaction(run_db):
    async def body(db: Database):
        conv = await db.get_or_create_conversation(KEY)
        _user, answer = await db.add_turns(
            conv.id, [{"role": "user", "text": "q", "user_id": "U1"}, {"role": "assistant", "status": "streaming"}]
        )
        kept = await reserve(db, images=1)
        await db.finish_turn(
            answer.id,
            usage_id=kept,
            tokens=42,
            text="the answer",
            status="done",
            finish_reason="stop",
            prompt_tokens=30,
            completion_tokens=12,
            ttft_ms=50,
            duration_ms=900,
        )
        await db.finish_turn(answer.id, usage_id=kept, tokens=42, status="done")  # a retried write: the same row
        # a ledger update that cannot be written (tokens NOT NULL) must roll the turn update back too
        _u2, failing = await db.add_turns(conv.id, [{"role": "user"}, {"role": "assistant", "status": "streaming"}])
        released = await reserve(db, user="U2")
        with pytest.raises(IntegrityError):
            await db.finish_turn(failing.id, usage_id=released, tokens=None, text="lost", status="done")
        reserved = await db.usage_since("slack", "T1", "U2", NOW - timedelta(hours=1))
        await db.finish_turn(failing.id, status="failed", error="boom", usage_id=released, release=True)
        async with db.sessions() as session:
            ledger = list(await session.scalars(select(UsageEntry)))
        return await db.turns(conv.id), ledger, reserved

    turns, ledger, reserved = run_db(body)
    done, failed = turns[1], turns[3]
    assert (done.text, done.status, done.finish_reason) == ("the answer", "done", "stop")
    assert (done.prompt_tokens, done.completion_tokens, done.ttft_ms, done.duration_ms) == (30, 12, 50, 900)
    assert as_utc(done.updated_at) >= as_utc(done.created_at)
    assert (failed.text, failed.status, failed.error) == ("", "failed", "boom")
    assert reserved == UsageTotals(requests=1, tokens=0, images=0)  # counted from admission until released
    assert len(ledger) == 1
    entry = ledger[0]
    assert (entry.turn_id, entry.user_id, entry.requests, entry.tokens, entry.images) == (done.id, "U1", 1, 42, 1)


def test_an_admission_that_raises_leaves_no_reservation_and_reads_exclude_its_own(run_db):
    async def body(db: Database):
        await reserve(db)
        since = NOW - timedelta(hours=1)
        with pytest.raises(LookupError):
            async with db.admission("slack", "T1", "U1", UsageTotals(requests=1, images=2)) as admission:
                before = (await admission.usage_windows("slack", "T1", "U1", {"today": since}))["today"]
                inside = await db.quota_setting("user", "slack", "T1", "U1")
                raise LookupError("refused")
        after = await db.usage_since("slack", "T1", "U1", since)
        await db.release_usage(await reserve(db))
        return before, inside, after, await db.usage_since("slack", "T1", None, since)

    before, inside, after, released = run_db(body)
    assert before == after == released == UsageTotals(requests=1)  # its own row is not "used before it"
    assert inside is None


def test_mark_interrupted_keeps_unfinished_answers(run_db):
    async def body(db: Database):
        conv = await db.get_or_create_conversation(KEY)
        await db.add_turns(
            conv.id,
            [
                {"role": "user", "text": "q"},
                {"role": "assistant", "text": "half an ans", "status": "streaming"},
                {"role": "assistant", "status": "pending"},
                {"role": "assistant", "text": "ok", "status": "done", "finish_reason": "stop"},
                {"role": "assistant", "status": "failed", "finish_reason": "error"},
            ],
        )
        changed = await db.mark_interrupted()
        again = await db.mark_interrupted()
        return changed, again, await db.turns(conv.id)

    changed, again, turns = run_db(body)
    assert (changed, again) == (2, 0)
    assert [(t.status, t.finish_reason) for t in turns] == [
        ("done", None),
        ("interrupted", "interrupted"),
        ("interrupted", "interrupted"),
        ("done", "stop"),
        ("failed", "error"),
    ]
    assert turns[1].text == "half an ans"  # kept, not deleted


def test_mark_interrupted_spares_the_answers_of_live_workers(run_db):
    """Several processes on one database: only answers of workers that are gone (stale heartbeat, listed dead,
    unknown) are marked; the caller's own (just registered) and live workers' answers keep streaming."""

    async def body(db: Database):
        now = db.now()
        await db.register_worker("me", "h", 1)
        await db.register_worker("live", "h2", 2)
        await db.register_worker("crashed", "h", 3)
        await db.register_worker("silent", "h3", 4)
        async with db.sessions.begin() as session:  # "silent" stopped beating two minutes ago
            await session.execute(
                update(Worker).where(Worker.id == "silent").values(seen_at=now - timedelta(minutes=2))
            )
        conv = await db.get_or_create_conversation(KEY)
        owners = ["me", "live", "crashed", "silent", None, "pruned-long-ago"]
        await db.add_turns(conv.id, [{"role": "assistant", "status": "streaming", "worker": w} for w in owners])
        changed = await db.mark_interrupted(live_since=now - timedelta(minutes=1), dead=["crashed"])
        return changed, [t.status for t in await db.turns(conv.id)], [w.id for w in await db.workers()]

    changed, statuses, workers = run_db(body)
    assert changed == 4
    assert statuses == ["streaming", "streaming", "interrupted", "interrupted", "interrupted", "interrupted"]
    assert sorted(workers) == ["crashed", "live", "me"]  # the stale row is pruned; "crashed" is gone at its next sweep


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
