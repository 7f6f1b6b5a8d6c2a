"""The admin tables at 80 columns: one line per row, ids whole (issue 26, item 10)."""

from __future__ import annotations

import pytest
from admin_helpers import NOW, Env

from storage import Database

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
