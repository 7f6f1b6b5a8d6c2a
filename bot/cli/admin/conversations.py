"""``minigpt4-bot admin conversations list|show|export|purge``: stored conversations.

The export format is the core's (:func:`bot.core.reports.conversation_document`); this module renders.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from bot.cli.admin._common import add_row, fail, known_platform, run, say, settings_for, table, when
from bot.cli.common import ConfigOption, out
from bot.core import reports

if TYPE_CHECKING:
    from storage import Database

__all__ = ["conversations_app"]

conversations_app = typer.Typer(help="Look at, export and purge stored conversations.", no_args_is_help=True)


class ExportFormat(StrEnum):
    json = "json"
    jsonl = "jsonl"


def _shorten(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _conversation_table() -> Table:
    """Readable at 80 columns: the id (what ``show`` takes) and times never wrap, platform/workspace/channel
    share one folding column, and a long thread id is cut with an ellipsis on a narrow terminal."""
    shown = Table(title=Text("conversations (most recent first)"))
    shown.add_column("id", no_wrap=True)
    shown.add_column("platform/workspace/channel", overflow="fold", min_width=16)
    shown.add_column("thread", no_wrap=True, overflow="ellipsis", max_width=None if out.width >= 120 else 12)
    shown.add_column("preset", overflow="fold", min_width=7)
    shown.add_column("turns", no_wrap=True, justify="right")
    shown.add_column("updated (UTC)", no_wrap=True)
    return shown


@conversations_app.command("list")
def conversations_list(
    platform: Annotated[str | None, typer.Option("--platform", "-p", callback=known_platform)] = None,
    workspace: Annotated[str | None, typer.Option("--workspace", "-w")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    config: ConfigOption = None,
) -> None:
    """The most recently active conversations with their turn counts."""
    settings = settings_for(config)
    rows = run(settings, lambda db: db.list_conversations(platform=platform, workspace=workspace, limit=limit))
    if not rows:
        say("No conversations stored.")
        return
    shown = _conversation_table()
    for conv, count in rows:
        place = f"{conv.platform}/{conv.workspace}/{conv.channel}"
        updated = when(conv.updated_at) + (f"\narchived {when(conv.archived_at)}" if conv.archived_at else "")
        add_row(shown, conv.id, place, conv.thread, conv.preset or "-", count, updated)
    say(shown)


@conversations_app.command("show")
def conversations_show(
    conversation_id: Annotated[int, typer.Argument(metavar="ID", help="conversation id (see `conversations list`)")],
    width: Annotated[int, typer.Option("--width", min=10, help="characters of text shown per turn")] = 80,
    config: ConfigOption = None,
) -> None:
    """One conversation's turns as a table (text shortened; `export` has it in full)."""
    settings = settings_for(config)
    record = run(settings, lambda db: reports.load_conversation(db, conversation_id))
    if record is None:
        fail(f"No conversation {conversation_id}.")
    conv = record.conversation
    state = f"archived {when(conv.archived_at)}" if conv.archived_at else "live"
    say(
        f"conversation {conv.id}: {conv.platform}/{conv.workspace} channel {conv.channel} thread {conv.thread} "
        f"preset {conv.preset or '-'}, created {when(conv.created_at)}, {state}",
    )
    if not record.turns:
        say("(no turns)")
        return
    shown = table(None, ("seq", "role", "user", "status", "tokens in/out", "image", "text", "at"), fold=True)
    for t in record.turns:
        image = record.image(t)
        reason = f" ({t.finish_reason})" if t.finish_reason and t.finish_reason != t.status else ""
        add_row(
            shown,
            t.seq,
            t.role,
            t.user_id or "",
            t.status + reason,
            f"{t.prompt_tokens}/{t.completion_tokens}" if t.role == "assistant" else "",
            image["sha256"][:12] if image else "",
            _shorten(t.error if t.status == "failed" and t.error else t.text, width),
            when(t.created_at),
        )
    say(shown)


@conversations_app.command("export")
def conversations_export(
    conversation_id: Annotated[int | None, typer.Argument(metavar="[ID]", help="one conversation")] = None,
    export_all: Annotated[bool, typer.Option("--all", help="every conversation, archived ones too")] = False,
    output: Annotated[ExportFormat, typer.Option("--format", "-f", help="json: one array; jsonl: a line each")] = (
        ExportFormat.json
    ),
    config: ConfigOption = None,
) -> None:
    """Full text of conversations as JSON on stdout. Images appear as sha256, size, type and pixels — no bytes."""
    settings = settings_for(config)
    if (conversation_id is None) == (not export_all):
        fail("give a conversation ID or --all (not both)", 2)

    async def work(db: Database) -> list[dict[str, Any] | None]:
        ids = await db.conversation_ids() if export_all or conversation_id is None else [conversation_id]
        return [await reports.conversation_document(db, cid) for cid in ids]

    documents = run(settings, work)
    if not export_all and documents == [None]:
        fail(f"No conversation {conversation_id}.")
    found = [d for d in documents if d is not None]  # --all: one purged meanwhile is left out
    if output is ExportFormat.jsonl:
        sys.stdout.write("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in found))
    else:
        sys.stdout.write(json.dumps(found, ensure_ascii=False, indent=2) + "\n")


@conversations_app.command("purge")
def conversations_purge(
    older_than_days: Annotated[int, typer.Option("--older-than-days", min=1, help="not active for N days")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    config: ConfigOption = None,
) -> None:
    """Delete conversations (turns, and images no longer used) not active for N days. Usage history stays."""
    settings = settings_for(config)
    cutoff, count = run(settings, lambda db: reports.purge_candidates(db, older_than_days))
    if not count:
        say(f"No conversations inactive since {cutoff:%Y-%m-%d %H:%M} UTC.")
        return
    if not yes and not typer.confirm(
        f"Delete {count} conversation(s) inactive since {cutoff:%Y-%m-%d %H:%M} UTC, with their turns and images?"
    ):
        say("Nothing deleted.")
        raise typer.Exit(1)
    purged = run(settings, lambda db: db.purge_conversations(cutoff))
    say(f"Deleted {purged} conversation(s); the usage ledger is kept.")
