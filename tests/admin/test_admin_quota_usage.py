"""``admin quota …`` and ``admin usage``: limits per user and workspace, and the usage report."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta
from typing import Any

from admin_helpers import NOW, TODAY, Env

from storage import Database

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
