"""``minigpt4-bot admin …`` through typer's CliRunner, on SQLite and on a real PostgreSQL.

Each test writes a bot.toml with ``[database] url = …`` in a temp folder; the schema is made by
``admin db upgrade`` itself.  Data is seeded and checked with ``storage.Database`` directly.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, update
from sqlalchemy.ext.asyncio import create_async_engine
from typer.testing import CliRunner

import bot.cli.common
from bot.cli.main import app
from bot.core.quotas import reservation
from bot.core.requests import ThreadRef
from storage import Database, migrate
from storage.tables import Base, Conversation, UsageEntry
from tests.http_helpers import closed_port
from tests.pg import create_database, truncate_tables

runner = CliRunner()
_numbers = itertools.count()
# The admin commands read the database's clock (wall-clock UTC); it is pinned mid-day so that "today" in the
# seeded data and in the command's windows are the same day whatever the date the suite runs.
NOW = datetime(2026, 7, 15, 12, 0, tzinfo=UTC)
TODAY = NOW.replace(hour=0, minute=0, second=0, microsecond=0)


@pytest.fixture(autouse=True)
def _pinned_clock():
    with time_machine.travel(NOW, tick=True):
        yield


@dataclass
class Env:
    """A bot.toml pointing at a migrated database, and that database's async URL."""

    config: Path
    url: str
    backend: str

    def run(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Any:
        return runner.invoke(app, ["admin", *args, "--config", str(self.config)], input=input, env=env)

    def db(self, fn: Callable[[Database], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            db = Database(self.url)
            try:
                return await fn(db)
            finally:
                await db.dispose()

        return asyncio.run(main())


def _write_config(folder: Path, url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bot.toml"
    path.write_text(f'data_dir = "state"\n\n[database]\nurl = "{url}"\n')
    return path


def _upgrade(config: Path) -> Any:
    result = runner.invoke(app, ["admin", "db", "upgrade", "--config", str(config)])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINIGPT4_BOT_DATABASE_URL", raising=False)
    monkeypatch.delenv("MINIGPT4_BOT_CONFIG", raising=False)
    monkeypatch.setattr(bot.cli.common.out, "width", 220)  # a wide terminal: table cells are not folded


@pytest.fixture(scope="module")
def pg_admin_url(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One PostgreSQL database for this module, migrated once by `admin db upgrade`, truncated per test."""
    url = create_database(postgres_url, f"admin_{next(_numbers)}")
    _upgrade(_write_config(tmp_path_factory.mktemp("pg-admin"), url.replace("+asyncpg", "")))
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    if request.param == "sqlite":
        config = _write_config(tmp_path, "sqlite:///admin.db")  # plain URL, relative to bot.toml
        _upgrade(config)
        return Env(config, f"sqlite+aiosqlite:///{tmp_path / 'admin.db'}", "sqlite")
    url = request.getfixturevalue("pg_admin_url")
    truncate_tables(url, [t.name for t in Base.metadata.sorted_tables])
    return Env(_write_config(tmp_path, url.replace("+asyncpg", "")), url, "postgres")


# ---------------------------------------------------------------------------- db


def test_db_upgrade_creates_the_schema_and_is_idempotent(request: pytest.FixtureRequest, tmp_path: Path, backend):
    config, _url = _fresh_config(request, tmp_path, backend)
    args = ["admin", "db", "current", "--config", str(config)]
    before = runner.invoke(app, args)
    assert before.exit_code == 0 and "revision none" in before.output
    first = _upgrade(config)
    head = migrate.head()
    assert f"upgraded from empty to revision {head}" in first.output
    again = _upgrade(config)
    assert f"at revision {head} (nothing to do)" in again.output
    after = runner.invoke(app, args)
    assert f"revision {head}, newest {head} (up to date)" in after.output


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def _fresh_config(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> tuple[Path, str]:
    """A bot.toml for a new, empty database, and that database's async URL."""
    if backend == "sqlite":
        return _write_config(tmp_path, f"sqlite:///{tmp_path / 'fresh.db'}"), f"sqlite+aiosqlite:///{tmp_path}/fresh.db"
    url = create_database(request.getfixturevalue("postgres_url"), f"fresh_{next(_numbers)}")
    return _write_config(tmp_path, url), url


def _tables(url: str) -> set[str]:
    async def names() -> set[str]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
        finally:
            await engine.dispose()

    return asyncio.run(names()) & {t.name for t in Base.metadata.sorted_tables}


def test_db_downgrade_to_base_asks_first_then_drops_the_tables(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
):
    config, url = _fresh_config(request, tmp_path, backend)
    every_table = {t.name for t in Base.metadata.sorted_tables}
    _upgrade(config)
    assert _tables(url) == every_table
    head = migrate.head()
    args = ["admin", "db", "downgrade", "--revision", "base", "--config", str(config)]

    declined = runner.invoke(app, args, input="n\n")
    assert declined.exit_code == 1, declined.output
    assert f"downgrade from revision {head} to base (drops every table and all stored data)" in declined.output
    assert "Nothing changed." in declined.output
    assert _tables(url) == every_table
    unanswered = runner.invoke(app, args)  # no terminal to answer on: refused as well
    assert unanswered.exit_code == 1 and _tables(url) == every_table

    confirmed = runner.invoke(app, args, input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert f"downgraded from {head} to revision base (no tables)" in confirmed.output
    assert _tables(url) == set()
    current = runner.invoke(app, ["admin", "db", "current", "--config", str(config)])
    assert "revision none" in current.output
    nothing = runner.invoke(app, args)
    assert nothing.exit_code == 0 and "nothing to downgrade" in nothing.output

    again = _upgrade(config)
    assert f"upgraded from empty to revision {head}" in again.output
    assert _tables(url) == every_table


def test_db_downgrade_by_steps_with_yes_and_bad_targets(request: pytest.FixtureRequest, tmp_path: Path, backend: str):
    config, url = _fresh_config(request, tmp_path, backend)
    _upgrade(config)
    head = migrate.head()

    def downgrade(*args: str) -> Any:
        return runner.invoke(app, ["admin", "db", "downgrade", *args, "--config", str(config)])

    unknown = downgrade("--revision", "nosuchrevision", "--yes")
    assert unknown.exit_code == 2 and "Cannot downgrade to 'nosuchrevision'" in unknown.output
    same = downgrade("--revision", head, "--yes")
    assert same.exit_code == 0 and f"at revision {head} (nothing to do)" in same.output
    too_far = downgrade("--revision", "-99", "--yes")
    assert too_far.exit_code == 2

    steps = [r.revision for r in ScriptDirectory.from_config(migrate.alembic_config()).walk_revisions()]
    below = steps[1] if len(steps) > 1 else "base"
    one_down = downgrade("--revision", "-1", "--yes")  # --yes: no question asked
    assert one_down.exit_code == 0, one_down.output
    assert f"downgrade from revision {head} to {below}" in one_down.output and "Downgrade now?" not in one_down.output
    assert migrate.current(url) == (None if below == "base" else below)
    if below != "base":
        up = downgrade("--revision", head, "--yes")
        assert up.exit_code == 2 and "not below the current revision" in up.output
    assert _upgrade(config).exit_code == 0 and migrate.current(url) == head


# ---------------------------------------------------------------------------- quotas


def _usage(user: str, at: datetime, workspace: str = "T1", **values: int) -> dict[str, Any]:
    return {"platform": "slack", "workspace": workspace, "user_id": user, "at": at, **values}


def test_quota_set_show_and_reset(env: Env):
    result = env.run(
        "quota", "set", "--platform", "slack", "--workspace", "T1", "--user", "U1",
        "--requests-per-day", "50", "--tokens-per-month", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "requests_per_day = 50" in result.output and "tokens_per_month = unlimited" in result.output
    assert "images_per_day = -" in result.output

    ws = env.run("quota", "set", "-p", "slack", "-w", "T1", "--tokens-per-day", "100000")
    assert ws.exit_code == 0 and "Quota for workspace in slack/T1" in ws.output

    async def seed(db: Database) -> None:
        month_start = TODAY.replace(day=1)
        await db.record_usage(**_usage("U1", NOW, tokens=300, images=2))
        await db.record_usage(**_usage("U1", NOW, tokens=200, requests=2))
        await db.record_usage(**_usage("U2", NOW, tokens=7))
        await db.record_usage(**_usage("U1", month_start - timedelta(days=1), tokens=9999))  # last month
        if month_start < TODAY:  # earlier this month, not today
            await db.record_usage(**_usage("U1", month_start, tokens=1000))

    env.db(seed)
    shown = env.run("quota", "show", "-p", "slack", "-w", "T1", "-u", "U1")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()

    def row(title: str, name: str) -> list[str]:
        start = next(i for i, line in enumerate(lines) if title in line)
        line = next(line for line in lines[start:] if f" {name} " in line)
        return [cell.strip() for cell in line.strip("│ ").split("│")]

    month_tokens = 500 + (1000 if TODAY.replace(day=1) < TODAY else 0)
    assert row("user U1 in slack/T1", "requests_per_day") == ["requests_per_day", "200", "50", "50", "3"]
    assert row("user U1 in slack/T1", "tokens_per_month") == [
        "tokens_per_month", "unlimited", "unlimited", "unlimited", f"{month_tokens:,}",
    ]  # fmt: skip
    assert row("user U1 in slack/T1", "images_per_day") == ["images_per_day", "100", "-", "100", "2"]
    assert row("workspace slack/T1", "tokens_per_day") == ["tokens_per_day", "unlimited", "100,000", "100,000", "507"]

    listing = env.run("quota", "show")
    assert listing.exit_code == 0
    assert "U1" in listing.output and "100,000" in listing.output and listing.output.count("slack") == 2

    back = env.run("quota", "set", "-p", "slack", "-w", "T1", "-u", "U1", "--requests-per-day", "none")
    assert back.exit_code == 0 and "requests_per_day = -" in back.output

    stored = env.db(lambda db: db.quota_setting("user", "slack", "T1", "U1"))
    assert (stored.requests_per_day, stored.tokens_per_month, stored.images_per_day) == (None, 0, None)

    reset = env.run("quota", "reset", "-p", "slack", "-w", "T1", "-u", "U1")
    assert reset.exit_code == 0 and "Removed the quota override for user U1" in reset.output
    again = env.run("quota", "reset", "-p", "slack", "-w", "T1", "-u", "U1")
    assert again.exit_code == 0 and "No quota override stored" in again.output
    assert env.db(lambda db: db.quota_setting("user", "slack", "T1", "U1")) is None
    assert env.db(lambda db: db.quota_setting("workspace", "slack", "T1")) is not None

    plain = env.run("quota", "show", "-p", "slack", "-w", "T9", "-u", "nobody")
    assert plain.exit_code == 0 and "no stored override for this user" in plain.output


def test_ids_with_brackets_are_printed_literally(env: Env):
    """Rich would read ``[model]`` as a style (and drop it) and fail on ``[/INST]``: ids are shown as given."""
    workspace, user = "[model]", "[/INST]"
    result = env.run("quota", "set", "-p", "slack", "-w", workspace, "-u", user, "--images-per-day", "3")
    assert result.exit_code == 0, result.output
    assert "Quota for user [/INST] in slack/[model]:" in result.output
    shown = env.run("quota", "show", "-p", "slack", "-w", workspace, "-u", user)
    assert shown.exit_code == 0, shown.output
    assert "user [/INST] in slack/[model]" in shown.output and "workspace slack/[model]" in shown.output
    bad = env.run("quota", "set", "-p", "slack", "-w", workspace, "--tokens-per-day", "[/INST]")
    assert bad.exit_code == 2 and "got '[/INST]'" in bad.output


def test_quota_set_rejects_bad_values(env: Env):
    bad = env.run("quota", "set", "-p", "slack", "-w", "T1", "--tokens-per-day", "lots")
    assert bad.exit_code == 2 and "expected a number" in bad.output
    negative = env.run("quota", "set", "-p", "slack", "-w", "T1", "--tokens-per-day", "-5")
    assert negative.exit_code == 2 and "must not be negative" in negative.output
    huge = env.run("quota", "set", "-p", "slack", "-w", "T1", "--tokens-per-month", str(2**31))
    assert huge.exit_code == 2 and "at most 2,147,483,647" in huge.output
    nothing = env.run("quota", "set", "-p", "slack", "-w", "T1")
    assert nothing.exit_code == 2 and "at least one limit" in nothing.output
    half = env.run("quota", "show", "-p", "slack")
    assert half.exit_code == 2 and "both --platform and --workspace" in half.output
    assert env.db(lambda db: db.list_quotas()) == []


# ---------------------------------------------------------------------------- usage


def _seed_usage(env: Env) -> None:
    async def seed(db: Database) -> None:
        await db.record_usage(**_usage("U1", NOW, tokens=100, images=1))
        await db.record_usage(**_usage("U1", NOW - timedelta(days=2), tokens=50))
        await db.record_usage(**_usage("U2", NOW, tokens=400, requests=3))
        await db.record_usage(**_usage("U3", NOW, workspace="T2", tokens=10))
        await db.record_usage(platform="discord", workspace="G1", user_id="D1", at=NOW, tokens=1)
        await db.record_usage(**_usage("U1", NOW - timedelta(days=60), tokens=5000))  # outside 30 days

    env.db(seed)


def test_usage_report_as_csv_json_and_table(env: Env):
    _seed_usage(env)
    as_csv = env.run("usage", "--format", "csv")
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(r["platform"], r["workspace"], r["user_id"], r["requests"], r["tokens"], r["images"]) for r in rows] == [
        ("slack", "T1", "U2", "3", "400", "0"),
        ("slack", "T1", "U1", "2", "150", "1"),
        ("slack", "T2", "U3", "1", "10", "0"),
        ("discord", "G1", "D1", "1", "1", "0"),
    ]

    as_json = env.run("usage", "--format", "json", "--platform", "slack", "--workspace", "T1")
    data = json.loads(as_json.stdout)
    assert data == [
        {"platform": "slack", "workspace": "T1", "user_id": "U2", "requests": 3, "tokens": 400, "images": 0},
        {"platform": "slack", "workspace": "T1", "user_id": "U1", "requests": 2, "tokens": 150, "images": 1},
    ]

    by_day = json.loads(env.run("usage", "--by-day", "--format", "json", "-p", "slack", "-w", "T1").stdout)
    today, two_days_ago = f"{NOW:%Y-%m-%d}", f"{NOW - timedelta(days=2):%Y-%m-%d}"
    assert [(r["day"], r["user_id"], r["tokens"]) for r in by_day] == [
        (today, "U2", 400),
        (today, "U1", 100),
        (two_days_ago, "U1", 50),
    ]

    top = json.loads(env.run("usage", "--top", "1", "--by-day", "--format", "json").stdout)
    assert {r["user_id"] for r in top} == {"U2"}
    top2 = list(csv.DictReader(io.StringIO(env.run("usage", "--top", "2", "--by-day", "-f", "csv").stdout)))
    assert sorted((r["user_id"], r["day"]) for r in top2) == sorted(
        [("U2", today), ("U1", today), ("U1", two_days_ago)]
    )

    recent = json.loads(env.run("usage", "--days", "1", "-f", "json", "-p", "slack", "-w", "T1").stdout)
    assert {r["user_id"]: r["tokens"] for r in recent} == {"U2": 400, "U1": 100}
    longer = json.loads(env.run("usage", "--days", "90", "-f", "json", "-p", "slack", "-w", "T1").stdout)
    assert {r["user_id"]: r["tokens"] for r in longer} == {"U2": 400, "U1": 5150}

    table = env.run("usage", "--platform", "discord")
    assert table.exit_code == 0
    assert "D1" in table.output and "U1" not in table.output and "total" in table.output
    empty = env.run("usage", "--platform", "nowhere")
    assert "No usage since" in empty.output


# ---------------------------------------------------------------------------- access rules


def test_allow_deny_list_and_remove(env: Env):
    added = env.run("allow", "user", "U1", "--platform", "slack", "--note", "pilot [b]user[/b]")
    assert added.exit_code == 0 and "Added: allow user U1 on slack" in added.output
    duplicate = env.run("allow", "user", "U1", "--platform", "slack")
    assert duplicate.exit_code == 0 and "Already there" in duplicate.output
    assert env.run("deny", "channel", "C666", "-p", "slack").exit_code == 0
    assert env.run("deny", "workspace", "G9", "-p", "discord", "--note", "abuse").exit_code == 0

    listing = env.run("list")
    assert listing.exit_code == 0
    for text in ("U1", "pilot [b]user[/b]", "C666", "G9", "abuse"):  # stored text is shown as is, not as markup
        assert text in listing.output
    slack_only = env.run("list", "--platform", "slack")
    assert "G9" not in slack_only.output and "C666" in slack_only.output

    rules = env.db(lambda db: db.rules())
    assert sorted((r.action, r.target, r.platform, r.value, r.note) for r in rules) == [
        ("allow", "user", "slack", "U1", "pilot [b]user[/b]"),
        ("deny", "channel", "slack", "C666", None),
        ("deny", "workspace", "discord", "G9", "abuse"),
    ]

    removed = env.run("allow", "user", "U1", "--platform", "slack", "--remove")
    assert removed.exit_code == 0 and "Removed allow rule for user U1" in removed.output
    missing = env.run("deny", "user", "U1", "--platform", "slack", "--remove")
    assert missing.exit_code == 0 and "There was no deny rule" in missing.output
    assert len(env.db(lambda db: db.rules())) == 2

    wrong = env.run("allow", "team", "X", "--platform", "slack")
    assert wrong.exit_code == 2
    assert env.run("deny", "user", "U2").exit_code == 2  # --platform is required

    for rule in ("channel C666 -p slack", "workspace G9 -p discord"):
        target, value, _, platform = rule.split()
        env.run("deny", target, value, "-p", platform, "--remove")
    assert "No access rules" in env.run("list").output


def test_role_rules_add_list_and_remove(env: Env):
    added = env.run("allow", "role", "1122334455", "--platform", "discord", "--note", "ML team")
    assert added.exit_code == 0 and "Added: allow role 1122334455 on discord" in added.output
    assert "Already there" in env.run("allow", "role", "1122334455", "-p", "discord").output
    assert env.run("deny", "role", "9988776655", "-p", "discord", "--note", "Muted").exit_code == 0
    listing = env.run("list", "--platform", "discord")
    assert listing.exit_code == 0
    for text in ("role", "1122334455", "ML team", "9988776655", "Muted"):
        assert text in listing.output
    rules = env.db(lambda db: db.rules("discord"))
    assert sorted((r.action, r.target, r.value, r.note) for r in rules) == [
        ("allow", "role", "1122334455", "ML team"),
        ("deny", "role", "9988776655", "Muted"),
    ]

    removed = env.run("deny", "role", "9988776655", "-p", "discord", "--remove")
    assert removed.exit_code == 0 and "Removed deny rule for role 9988776655 on discord" in removed.output
    assert [(r.action, r.value) for r in env.db(lambda db: db.rules())] == [("allow", "1122334455")]

    help_text = " ".join(env.run("allow", "--help").output.replace("│", " ").split())  # unwrapped
    assert "workspace|role" in help_text and "Copy Role ID" in help_text and "DMs have no roles" in help_text

    wrong = env.run("deny", "group", "42", "-p", "discord")
    assert wrong.exit_code == 2
    assert "'group' is not one of" in wrong.output and "'role'" in wrong.output
    assert len(env.db(lambda db: db.rules())) == 1


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


# ---------------------------------------------------------------------------- configuration and errors


def test_environment_url_overrides_the_file(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    other = tmp_path / "other"
    other_config = _write_config(other, "sqlite:///other.db")
    _upgrade(other_config)
    monkeypatch.setenv("MINIGPT4_BOT_DATABASE_URL", env.url.replace("+asyncpg", "").replace("+aiosqlite", ""))
    result = runner.invoke(app, ["admin", "allow", "user", "UX", "-p", "slack", "--config", str(other_config)])
    assert result.exit_code == 0
    assert [r.value for r in env.db(lambda db: db.rules())] == ["UX"]  # written to the env's database


def test_bad_urls_and_unreachable_databases_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bad_scheme = _write_config(tmp_path / "a", "mysql://bot@db/minigpt4")
    result = runner.invoke(app, ["admin", "list", "--config", str(bad_scheme)])
    assert result.exit_code == 2 and "unsupported database URL scheme 'mysql'" in result.output

    secret = _write_config(tmp_path / "b", "postgresql://bot:hunter2@db/minigpt4")
    result = runner.invoke(app, ["admin", "list", "--config", str(secret)])
    assert result.exit_code == 2 and "MINIGPT4_BOT_DATABASE_URL" in result.output
    assert "hunter2" not in result.output

    plain = _write_config(tmp_path / "c", "")
    monkeypatch.setenv("MINIGPT4_BOT_DATABASE_URL", "not a url")
    result = runner.invoke(app, ["admin", "usage", "--config", str(plain)])
    assert result.exit_code == 2 and "not a database URL" in result.output

    port = closed_port()
    monkeypatch.setenv("MINIGPT4_BOT_DATABASE_URL", f"postgresql://bot:s3cret@127.0.0.1:{port}/minigpt4")
    for args in (["list"], ["db", "upgrade"], ["db", "current"]):
        result = runner.invoke(app, ["admin", *args, "--config", str(plain)])
        assert result.exit_code == 1, (args, result.output)
        assert "cannot connect" in result.output and f"127.0.0.1:{port}" in result.output
        assert "s3cret" not in result.output  # the password is never printed

    monkeypatch.delenv("MINIGPT4_BOT_DATABASE_URL")
    result = runner.invoke(app, ["admin", "usage", "--config", str(plain)])  # default SQLite file, no schema yet
    assert result.exit_code == 1 and "admin db upgrade" in result.output
    assert (tmp_path / "c" / "state" / "minigpt4-bot.db").is_file()  # <data_dir>/minigpt4-bot.db


def test_missing_schema_on_postgres_points_at_upgrade(postgres_url: str, tmp_path: Path):
    url = create_database(postgres_url, f"noschema_{next(_numbers)}")
    config = _write_config(tmp_path, url)
    result = runner.invoke(app, ["admin", "quota", "show", "--config", str(config)])
    assert result.exit_code == 1 and "admin db upgrade" in result.output


def test_outside_the_project_folder_it_says_no_bot_toml_was_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINIGPT4_BOT_CONFIG", raising=False)
    result = runner.invoke(app, ["admin", "db", "upgrade"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "No bot.toml found" in said and str(tmp_path / "data" / "minigpt4-bot.db") in said


def test_an_unknown_platform_gets_a_warning_naming_the_known_ones(env: Env):
    result = env.run("usage", "-p", "nonsense")
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "no front end is called 'nonsense'" in said and "terminal" in said and "web" in said


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


def test_quota_override_names_users_as_the_core_spells_them(env: Env):
    """A web user is case-folded by the core (``Q1`` and ``q1`` are one person); a Slack id keeps its case."""
    web = env.run("quota", "set", "-p", "web", "-w", "local\u200b", "-u", "Q1", "--requests-per-day", "5")
    assert web.exit_code == 0, web.output
    slack = env.run("quota", "set", "-p", "slack", "-w", "T1", "-u", "U1", "--requests-per-day", "7")
    assert slack.exit_code == 0, slack.output
    stored_web = env.db(lambda db: db.quota_setting("user", "web", "local", "q1"))
    stored_slack = env.db(lambda db: db.quota_setting("user", "slack", "T1", "U1"))
    assert stored_web is not None and stored_web.requests_per_day == 5
    assert stored_slack is not None and stored_slack.requests_per_day == 7
    reset = env.run("quota", "reset", "-p", "web", "-w", "local", "-u", "q1\u200b")
    assert "Removed the quota override" in reset.output


# ---------------------------------------------------------------------------- 80 columns (issue 26, item 10)

EMAIL = "alice.longname@example-corporation.com"  # a web user behind a login proxy
TEAM, MEMBER = "T0123456789ABCDEFGHIJKLMNOP", "U0123456789ABCDEFGH"
SNOWFLAKE = "112233445566778899"
NOTE = "pilot user from the research group, asked for by Bob on 2026-07-01 after the demo"


def _seed_long_ids(env: Env) -> None:
    for rule in (
        ("allow", "user", EMAIL, "-p", "web", "--note", NOTE),
        ("deny", "workspace", TEAM, "-p", "slack", "--note", "abuse"),
        ("allow", "role", SNOWFLAKE, "-p", "discord"),
    ):
        assert env.run(*rule).exit_code == 0
    for scope in (("-p", "slack", "-w", TEAM, "-u", MEMBER), ("-p", "web", "-w", "local", "-u", EMAIL)):
        assert env.run("quota", "set", *scope, "--requests-per-day", "50", "--tokens-per-month", "0").exit_code == 0
    assert env.run("quota", "set", "-p", "slack", "-w", TEAM, "--tokens-per-day", "100000").exit_code == 0

    async def seed(db: Database) -> None:
        await db.record_usage(platform="web", workspace="local", user_id=EMAIL, at=NOW, tokens=123_456, requests=1234)
        await db.record_usage(platform="slack", workspace=TEAM, user_id=MEMBER, at=NOW, tokens=1_234_567_890)
        await db.record_usage(platform="discord", workspace=SNOWFLAKE, user_id="998877665544332211", at=NOW, tokens=7)

    env.db(seed)


def _rows(output: str) -> list[str]:
    """The body lines of a rich table (between the header rule and the bottom border, totals included)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    return [line for line in lines[start + 1 :] if line.startswith("│")]


@pytest.mark.parametrize(
    ("command", "rows", "whole"),
    [
        (("list",), 3, ("allow user", "deny workspace", "allow role", SNOWFLAKE, "abuse")),
        (("quota", "show"), 3, ("web/local", "100,000", " 50 ")),
        (("usage",), 4, ("1,234,567,890", "1,234", "123,456", "total")),
        (("usage", "--by-day"), 4, ("1,234,567,890", f"{NOW:%Y-%m-%d}")),
    ],
    ids=["access-list", "quota-overrides", "usage", "usage-by-day"],
)
def test_admin_tables_fit_80_columns_one_line_per_row(
    env: Env, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...], rows: int, whole: tuple[str, ...]
):
    """At COLUMNS=80 no line is longer than 80 and each record is one line (ids were folded over up to 8 lines);
    counts, days and short names are never cut, long ids and notes end in "…", and --wide shows them whole."""
    from bot.cli.common import out

    _seed_long_ids(env)
    monkeypatch.setattr(out, "_width", None)  # no fixed width: the console follows COLUMNS, as on a terminal
    result = env.run(*command, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(map(len, result.output.splitlines())) <= 80, result.output
    body = _rows(result.output)
    assert len(body) == rows and all(line.endswith("│") for line in body), result.output
    for text in whole:
        assert text in result.output, (text, result.output)
    assert "…" in result.output  # the long ids (or the note) were cut, not folded

    wide = env.run(*command, "--wide", env={"COLUMNS": "80"})
    assert wide.exit_code == 0, wide.output
    assert len(_rows(wide.output)) == rows and "…" not in wide.output
    shown = {"list": (EMAIL, NOTE, TEAM), "quota": (f"slack/{TEAM}", MEMBER, EMAIL), "usage": (TEAM, MEMBER, EMAIL)}
    for text in shown[command[0]]:
        assert text in wide.output, (text, wide.output)
