"""Every ``storage.Database`` method on SQLite and on a real PostgreSQL, including concurrent callers."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from db_helpers import KEY, NOW, reserve
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from bot.core.requests import ThreadRef
from storage import Database, UsageTotals, as_utc
from storage.tables import Conversation, ImageBlob, UsageEntry, Worker

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
