"""``minigpt4-bot admin usage``: the usage ledger per user, as a table or as CSV/JSON for scripts."""

from __future__ import annotations

import csv
import io
import json
import sys
from enum import StrEnum
from typing import Annotated

import typer

from bot.cli.admin._common import WIDE_HELP, add_row, known_platform, run, say, settings_for, show_table, table
from bot.cli.common import ConfigOption
from bot.core import reports
from bot.core.quotas import COUNTER_NAMES

__all__ = ["usage"]


class ReportFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def usage(
    days: Annotated[int, typer.Option("--days", min=1, help="look back this many days (UTC, incl. today)")] = 30,
    by_day: Annotated[bool, typer.Option("--by-day", help="one row per user and day")] = False,
    platform: Annotated[str | None, typer.Option("--platform", "-p", callback=known_platform)] = None,
    workspace: Annotated[str | None, typer.Option("--workspace", "-w")] = None,
    output: Annotated[ReportFormat, typer.Option("--format", "-f")] = ReportFormat.table,
    top: Annotated[int | None, typer.Option("--top", min=1, help="only the N users with the most tokens")] = None,
    wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False,
    config: ConfigOption = None,
) -> None:
    """Requests, tokens and images per user (largest token users first) from the usage ledger.

    The table is one line per user (and day): on a narrow terminal long workspace and user ids end in "…";
    the counts and days are never cut.  --wide, --format csv and --format json give every value whole.
    """
    settings = settings_for(config)
    report = run(
        settings,
        lambda db: reports.usage_report(db, days=days, platform=platform, workspace=workspace, by_day=by_day, top=top),
    )
    if output is ReportFormat.json:
        sys.stdout.write(json.dumps(report.rows, indent=2) + "\n")
        return
    if output is ReportFormat.csv:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=report.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(report.rows)
        sys.stdout.write(buffer.getvalue())
        return
    if not report.rows:
        say(f"No usage since {report.since:%Y-%m-%d}.")
        return
    shown = table(f"usage since {report.since:%Y-%m-%d} UTC", report.columns, right=COUNTER_NAMES)
    for r in report.rows:
        add_row(shown, *(f"{r[c]:,}" if isinstance(r[c], int) else r[c] for c in report.columns))
    shown.add_section()
    labels = ["total"] + [""] * (len(report.columns) - len(COUNTER_NAMES) - 1)
    add_row(shown, *labels, *(f"{sum(r[c] for r in report.rows):,}" for c in COUNTER_NAMES))
    show_table(shown, cut=[("workspace", "user_id")], wide=wide)
