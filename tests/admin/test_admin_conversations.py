"""``admin conversations …``: list, show, export, purge."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta

import pytest
from admin_helpers import NOW, Env
from sqlalchemy import select, update

from bot.core.quotas import reservation
from bot.core.requests import ThreadRef
from storage import Database
from storage.tables import Conversation, UsageEntry

# ---------------------------------------------------------------------------- conversations


LONG = "The picture shows " + "a very long description " * 10 + "THE END"
PNG = b"\x89PNG\r\n\x1a\n fake pixels"


def _seed_conversations(env: Env) -> tuple[int, int]:
    async def seed(db: Database) -> tuple[int, int]:
        conv = await db.get_or_create_conversation(ThreadRef("slack", "T1", "C1", "1700.01"))
        await db.set_preset(conv.id, "recipe")
        image = await db.add_image(PNG, "image/png", 640, 480)
        _q, answer = await db.add_turns(
            conv.id,
            [
                {"role": "user", "text": "what can I cook?", "image_id": image, "user_id": "U1"},
                {"role": "assistant", "status": "streaming"},
            ],
        )
        async with db.admission("slack", "T1", "U1", reservation(pictures=1)) as admission:
            pass  # the request's usage, reserved when it was admitted; the final write adds its tokens
        await db.finish_turn(
            answer.id,
            usage_id=admission.usage_id,
            tokens=60,
            text=LONG,
            status="done",
            finish_reason="stop",
            prompt_tokens=40,
            completion_tokens=20,
        )
        old = await db.get_or_create_conversation(ThreadRef("discord", "G1", "C2", "m-1"))
        await db.add_turns(old.id, [{"role": "user", "text": "ancient question", "user_id": "D1"}])
        await db.archive_conversation(old.id)
        async with db.sessions.begin() as session:
            await session.execute(
                update(Conversation).where(Conversation.id == old.id).values(updated_at=NOW - timedelta(days=90))
            )
        return conv.id, old.id

    return env.db(seed)


def test_conversations_list_and_show(env: Env):
    conv_id, old_id = _seed_conversations(env)
    listing = env.run("conversations", "list")
    assert listing.exit_code == 0
    assert "1700.01" in listing.output and "m-1" in listing.output and "recipe" in listing.output
    assert listing.output.index("1700.01") < listing.output.index("m-1")  # most recent first

    shown = env.run("conversations", "show", str(conv_id), "--width", "40")
    assert shown.exit_code == 0, shown.output
    assert f"conversation {conv_id}: slack/T1 channel C1 thread 1700.01 preset recipe" in shown.output
    assert "what can I cook?" in shown.output
    assert "THE END" not in shown.output and "…" in shown.output  # long text is shortened
    assert hashlib.sha256(PNG).hexdigest()[:12] in shown.output
    assert "40/20" in shown.output and "done (stop)" in shown.output

    archived = env.run("conversations", "show", str(old_id))
    assert "archived" in archived.output and "ancient question" in archived.output
    missing = env.run("conversations", "show", "4242")
    assert missing.exit_code == 1 and "No conversation 4242" in missing.output


def test_conversations_export_json_and_jsonl(env: Env):
    conv_id, old_id = _seed_conversations(env)
    one = env.run("conversations", "export", str(conv_id), "--format", "json")
    assert one.exit_code == 0, one.output
    [doc] = json.loads(one.stdout)
    assert (doc["id"], doc["platform"], doc["thread"], doc["preset"], doc["archived_at"]) == (
        conv_id,
        "slack",
        "1700.01",
        "recipe",
        None,
    )
    question, answer = doc["turns"]
    assert question["image"] == {
        "sha256": hashlib.sha256(PNG).hexdigest(),
        "size": len(PNG),
        "mime": "image/png",
        "width": 640,
        "height": 480,
    }
    assert answer["text"] == LONG  # full text
    assert (answer["status"], answer["prompt_tokens"], answer["completion_tokens"]) == ("done", 40, 20)
    assert answer["image"] is None
    assert datetime.fromisoformat(doc["created_at"]).tzinfo is not None
    assert PNG.hex() not in one.stdout and "fake pixels" not in one.stdout  # no image bytes, in any encoding

    everything = env.run("conversations", "export", "--all", "--format", "jsonl")
    assert everything.exit_code == 0
    lines = everything.stdout.strip().splitlines()
    docs = [json.loads(line) for line in lines]
    assert [d["id"] for d in docs] == [conv_id, old_id]
    assert docs[1]["archived_at"] is not None and docs[1]["turns"][0]["text"] == "ancient question"

    assert env.run("conversations", "export").exit_code == 2
    assert env.run("conversations", "export", str(conv_id), "--all").exit_code == 2
    missing = env.run("conversations", "export", "999")
    assert missing.exit_code == 1 and "No conversation 999" in missing.output


def test_conversations_purge_asks_first(env: Env):
    conv_id, old_id = _seed_conversations(env)
    declined = env.run("conversations", "purge", "--older-than-days", "30", input="n\n")
    assert declined.exit_code == 1
    assert "Delete 1 conversation(s)" in declined.output and "Nothing deleted" in declined.output
    assert env.db(lambda db: db.get_conversation(old_id)) is not None

    confirmed = env.run("conversations", "purge", "--older-than-days", "30", input="y\n")
    assert confirmed.exit_code == 0 and "Deleted 1 conversation(s)" in confirmed.output
    assert env.db(lambda db: db.get_conversation(old_id)) is None
    assert env.db(lambda db: db.get_conversation(conv_id)) is not None

    async def age_and_count(db: Database) -> None:
        async with db.sessions.begin() as session:
            await session.execute(update(Conversation).values(updated_at=NOW - timedelta(days=10)))

    env.db(age_and_count)
    nothing = env.run("conversations", "purge", "--older-than-days", "30", "--yes")
    assert nothing.exit_code == 0 and "No conversations inactive" in nothing.output
    forced = env.run("conversations", "purge", "--older-than-days", "5", "--yes")
    assert forced.exit_code == 0 and "Deleted 1 conversation(s)" in forced.output
    assert env.db(lambda db: db.list_conversations()) == []

    async def ledger(db: Database) -> list[tuple[int, int | None]]:
        async with db.sessions() as session:
            return [(e.tokens, e.turn_id) for e in await session.scalars(select(UsageEntry))]

    assert env.db(ledger) == [(60, None)]  # usage history stays, detached from deleted turns


def test_conversations_list_keeps_ids_on_one_line_at_80_columns(env: Env, monkeypatch: pytest.MonkeyPatch):
    from bot.cli.common import out

    conv_id, old_id = _seed_conversations(env)
    long_thread = "0f9a3c1e2b4d4e6f8a9b0c1d2e3f4a5b"  # the terminal chat's thread ids: 32 hex digits

    async def seed(db: Database) -> int:
        return (await db.get_or_create_conversation(ThreadRef("terminal", "local", "terminal", long_thread))).id

    terminal_id = env.db(seed)
    monkeypatch.setattr(out, "width", 80)
    listing = env.run("conversations", "list")
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    for conversation in (conv_id, old_id, terminal_id):  # each id whole, in its row's first cell
        assert any(line.startswith(f"│ {conversation} ") for line in lines), listing.output
    row = next(line for line in lines if line.startswith(f"│ {terminal_id} "))
    assert long_thread[:8] in row  # the thread id starts on the row, not folded over 6 lines
    assert sum(long_thread[:6] in line or long_thread[-6:] in line for line in lines) == 1
