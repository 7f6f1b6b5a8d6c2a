"""``minigpt4-bot admin …``: quotas, usage reports, access rules, conversations and the database schema.

Every command works on the configured database (``[database] url`` in bot.toml, overridden by
``$MINIGPT4_BOT_DATABASE_URL``; SQLite ``<data_dir>/minigpt4-bot.db`` by default) — SQLite or
PostgreSQL alike.  Tables go to the terminal; ``--format csv|json`` output is plain text on stdout
for scripts.  Database problems (bad URL, server down, schema missing) print one clear line on
stderr and exit with status 1.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bot.cli.common import ConfigOption, err, out, setup
from bot.core.config import ConfigError, Settings
from bot.core.quotas import QuotaPolicy, day_start, month_start

if TYPE_CHECKING:
    from storage import Database

__all__ = ["admin_app"]

T = TypeVar("T")

QUOTA_FIELDS = ("requests_per_day", "requests_per_month", "tokens_per_day", "tokens_per_month", "images_per_day")
SHORT_NAMES = dict(zip(QUOTA_FIELDS, ("req/day", "req/month", "tok/day", "tok/month", "img/day"), strict=True))
MAX_LIMIT = 2**31 - 1  # the columns are 32-bit integers
NO_SCHEMA_HINT = "the database has no tables yet: run `minigpt4-bot admin db upgrade`"

admin_app = typer.Typer(
    help="Administer the bot's database: quotas, usage, access rules, conversations, schema.",
    no_args_is_help=True,
)
quota_app = typer.Typer(
    help=(
        "Per-user and per-workspace limits. Values: a number; 0 = unlimited; none = back to the "
        "configured default (the quotas tables in bot.toml)."
    ),
    no_args_is_help=True,
)
conversations_app = typer.Typer(help="Look at, export and purge stored conversations.", no_args_is_help=True)
db_app = typer.Typer(help="The database schema (Alembic migrations).", no_args_is_help=True)
admin_app.add_typer(quota_app, name="quota")
admin_app.add_typer(conversations_app, name="conversations")
admin_app.add_typer(db_app, name="db")


class Target(StrEnum):
    user = "user"
    channel = "channel"
    workspace = "workspace"


class ReportFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class ExportFormat(StrEnum):
    json = "json"
    jsonl = "jsonl"


PlatformOption = Annotated[str, typer.Option("--platform", "-p", help="slack | discord | web | terminal …")]
WorkspaceOption = Annotated[str, typer.Option("--workspace", "-w", help="Slack team / Discord guild id")]
UserOption = Annotated[str | None, typer.Option("--user", "-u", help="user id (omit for the workspace limits)")]
LimitOption = Annotated[str | None, typer.Option(metavar="N|0|none", help="a limit; 0 = unlimited; none = default")]


# ---------------------------------------------------------------------------- plumbing


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a URL too broken to parse is not printed back in full
        return url.partition("://")[0] + "://…"


def _database_url(settings: Settings) -> str:
    try:
        url = settings.database_url()
    except ConfigError as exc:
        _fail(f"Bad database URL: {exc}", code=2)
    if url.startswith("sqlite") and ":memory:" not in url:
        Path(url.partition(":///")[2]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return url


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]{escape(message)}[/red]", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _describe(exc: BaseException) -> str:
    """One line for a database error, with a hint where there is an obvious fix."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()[0] if str(original).strip() else type(original).__name__
    lowered = str(exc).lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"{NO_SCHEMA_HINT} ({text})"
    if isinstance(original, OSError | TimeoutError) or "connect" in lowered:
        return f"cannot connect: {text}"
    return text


def _run(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    """Open the configured database, run ``work(db)``, close it; database errors end the command cleanly."""
    from sqlalchemy.exc import SQLAlchemyError

    from storage import Database

    url = _database_url(settings)

    async def main() -> T:
        db = Database(url)
        try:
            return await work(db)
        finally:
            await db.dispose()

    try:
        return asyncio.run(main())
    except (SQLAlchemyError, OSError, TimeoutError, ValueError) as exc:
        _fail(f"Database error ({_safe_url(url)}): {_describe(exc)}")


def _settings(config: Path | None) -> Settings:
    settings = setup(config)
    # Alembic logs every plugin and step at INFO; the commands print their own one-line summary.
    logging.getLogger("alembic").setLevel(logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING)
    return settings


def _say(message: Any) -> None:
    """A table, or a line of plain text (never parsed as markup, never hard-wrapped) on stdout."""
    if isinstance(message, str):
        out.print(message, markup=False, highlight=False, soft_wrap=True)
    else:
        out.print(message)


def _add(table: Table, *cells: Any) -> None:
    """A table row of plain text: stored values (notes, message text) are never parsed as markup."""
    table.add_row(*(Text(str(cell)) for cell in cells))


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    from storage import as_utc

    return as_utc(value).strftime("%Y-%m-%d %H:%M")


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    from storage import as_utc

    return as_utc(value).isoformat()


def _parse_limit(name: str, value: str) -> int | None:
    if value.strip().lower() in ("none", "default", ""):
        return None
    try:
        number = int(value)
    except ValueError:
        _fail(f"--{name.replace('_', '-')}: expected a number, 0 (unlimited) or none (default), got {value!r}", 2)
    if number < 0:
        _fail(f"--{name.replace('_', '-')}: must not be negative (0 = unlimited)", 2)
    if number > MAX_LIMIT:
        _fail(f"--{name.replace('_', '-')}: at most {MAX_LIMIT:,} (use 0 for unlimited)", 2)
    return number


def _limit_text(value: int | None) -> str:
    if value is None:
        return "-"
    return "unlimited" if value == 0 else f"{value:,}"


# ---------------------------------------------------------------------------- quotas


@quota_app.command("show")
def quota_show(
    platform: Annotated[str | None, typer.Option("--platform", "-p", help="with --workspace: one scope")] = None,
    workspace: Annotated[str | None, typer.Option("--workspace", "-w")] = None,
    user: UserOption = None,
    config: ConfigOption = None,
) -> None:
    """Stored overrides and usage today / this month (UTC). Without --platform/--workspace: every override."""
    settings = _settings(config)
    if (platform is None) != (workspace is None):
        _fail("give both --platform and --workspace (or neither, to list every override)", 2)
    if user is not None and platform is None:
        _fail("--user needs --platform and --workspace", 2)

    if platform is None or workspace is None:
        rows = _run(settings, lambda db: db.list_quotas())
        table = Table(title="quota overrides (0 = unlimited, - = configured default)")
        for column in ("scope", "platform", "workspace", "user", *SHORT_NAMES.values(), "updated"):
            table.add_column(column, overflow="fold")
        for row in rows:
            limits = [_limit_text(getattr(row, f)) for f in QUOTA_FIELDS]
            _add(table, row.scope, row.platform, row.workspace, row.user_id or "-", *limits, _when(row.updated_at)[:10])
        _say(table if rows else "No quota overrides: the configured defaults apply to everyone.")
        return

    async def gather(db: Database) -> tuple[datetime, datetime, list[tuple[str, str, Any, Any, Any, Any]]]:
        today, month = day_start(db.now()), month_start(db.now())  # the database's clock, as the bot uses
        policy = QuotaPolicy(settings.quotas, db)  # the limits the bot enforces, computed the same way
        scopes = [("workspace", "")] + ([("user", user)] if user is not None else [])
        found = []
        for scope, who in scopes:
            row = await db.quota_setting(scope, platform, workspace, who)
            limits = await policy.effective(scope, platform, workspace, who)
            user_id = who if scope == "user" else None
            day = await db.usage_since(platform, workspace, user_id, today)
            mon = await db.usage_since(platform, workspace, user_id, month)
            found.append((scope, who, row, limits, day, mon))
        return today, month, found

    today, month, found = _run(settings, gather)
    for scope, who, row, limits, day, mon in reversed(found):
        defaults = settings.quotas.user if scope == "user" else settings.quotas.workspace
        title = f"{scope} {who} in {platform}/{workspace}" if who else f"workspace {platform}/{workspace}"
        table = Table(title=f"{title} (usage since {today:%Y-%m-%d} / {month:%Y-%m} UTC)")
        for column in ("limit", "default", "override", "effective", "used"):
            table.add_column(column, justify="left" if column == "limit" else "right")
        for name in QUOTA_FIELDS:
            override = getattr(row, name) if row is not None else None
            effective = getattr(limits, name)
            window = day if name.endswith("_day") else mon
            used = getattr(window, name.split("_per_")[0])
            _add(
                table,
                name,
                _limit_text(getattr(defaults, name)),
                _limit_text(override),
                _limit_text(effective),
                f"{used:,}",
            )
        _say(table)
        if row is None:
            _say(f"no stored override for this {scope}: the configured defaults apply")


@quota_app.command("set")
def quota_set(
    platform: PlatformOption,
    workspace: WorkspaceOption,
    user: UserOption = None,
    requests_per_day: LimitOption = None,
    requests_per_month: LimitOption = None,
    tokens_per_day: LimitOption = None,
    tokens_per_month: LimitOption = None,
    images_per_day: LimitOption = None,
    config: ConfigOption = None,
) -> None:
    """Override limits for a user (--user) or a whole workspace. N = the limit, 0 = unlimited, none = default.

    Limits not named keep their current value. Days and months are UTC calendar days and months.
    """
    settings = _settings(config)
    given = {
        "requests_per_day": requests_per_day,
        "requests_per_month": requests_per_month,
        "tokens_per_day": tokens_per_day,
        "tokens_per_month": tokens_per_month,
        "images_per_day": images_per_day,
    }
    limits = {name: _parse_limit(name, value) for name, value in given.items() if value is not None}
    if not limits:
        _fail("name at least one limit, e.g. --requests-per-day 50 (0 = unlimited, none = default)", 2)
    scope, who = ("user", user) if user else ("workspace", "")

    async def work(db: Database) -> Any:
        await db.set_quota(scope, platform, workspace, who, **limits)
        return await db.quota_setting(scope, platform, workspace, who)

    row = _run(settings, work)
    summary = ", ".join(f"{name} = {_limit_text(getattr(row, name))}" for name in QUOTA_FIELDS)
    target = f"user {who}" if who else "workspace"
    _say(f"Quota for {target} in {platform}/{workspace}: {summary}")


@quota_app.command("reset")
def quota_reset(
    platform: PlatformOption,
    workspace: WorkspaceOption,
    user: UserOption = None,
    config: ConfigOption = None,
) -> None:
    """Remove the stored override: the configured defaults apply again."""
    settings = _settings(config)
    scope, who = ("user", user) if user else ("workspace", "")
    removed = _run(settings, lambda db: db.reset_quota(scope, platform, workspace, who))
    target = f"user {who}" if who else "workspace"
    if removed:
        _say(f"Removed the quota override for {target} in {platform}/{workspace}.")
    else:
        _say(f"No quota override stored for {target} in {platform}/{workspace}.")


# ---------------------------------------------------------------------------- usage


@admin_app.command("usage")
def usage(
    days: Annotated[int, typer.Option("--days", min=1, help="look back this many days (UTC, incl. today)")] = 30,
    by_day: Annotated[bool, typer.Option("--by-day", help="one row per user and day")] = False,
    platform: Annotated[str | None, typer.Option("--platform", "-p")] = None,
    workspace: Annotated[str | None, typer.Option("--workspace", "-w")] = None,
    output: Annotated[ReportFormat, typer.Option("--format", "-f")] = ReportFormat.table,
    top: Annotated[int | None, typer.Option("--top", min=1, help="only the N users with the most tokens")] = None,
    config: ConfigOption = None,
) -> None:
    """Requests, tokens and images per user (largest token users first) from the usage ledger."""
    settings = _settings(config)

    async def report(db: Database) -> tuple[datetime, list[dict[str, Any]]]:
        since = day_start(db.now()) - timedelta(days=days - 1)  # the database's clock, as the bot uses
        return since, await db.usage_report(since, platform=platform, workspace=workspace, by_day=by_day)

    since, rows = _run(settings, report)
    rows = [{k: (int(v) if k in ("requests", "tokens", "images") else v) for k, v in r.items()} for r in rows]
    if top is not None:
        totals: dict[tuple[str, str, str], int] = {}
        for r in rows:
            key = (r["platform"], r["workspace"], r["user_id"])
            totals[key] = totals.get(key, 0) + r["tokens"]
        keep = set(sorted(totals, key=lambda k: (-totals[k], k))[:top])
        rows = [r for r in rows if (r["platform"], r["workspace"], r["user_id"]) in keep]
    columns = ["platform", "workspace", "user_id", *(["day"] if by_day else []), "requests", "tokens", "images"]

    if output is ReportFormat.json:
        sys.stdout.write(json.dumps([{c: r[c] for c in columns} for r in rows], indent=2) + "\n")
        return
    if output is ReportFormat.csv:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(buffer.getvalue())
        return
    table = Table(title=f"usage since {since:%Y-%m-%d} UTC")
    for column in columns:
        table.add_column(column, justify="right" if column in ("requests", "tokens", "images") else "left")
    for r in rows:
        _add(table, *(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in columns))
    if rows:
        sums = [sum(r[c] for r in rows) for c in ("requests", "tokens", "images")]
        table.add_section()
        _add(table, "total", "", "", *([""] if by_day else []), *(f"{s:,}" for s in sums))
    _say(table if rows else f"No usage since {since:%Y-%m-%d}.")


# ---------------------------------------------------------------------------- access rules


def _rule(action: str, target: Target, value: str, platform: str, note: str | None, remove: bool, config: Path | None):
    settings = _settings(config)
    if remove:
        done = _run(settings, lambda db: db.remove_rule(action, target.value, platform, value))
        message = "Removed" if done else "There was no"
        _say(f"{message} {action} rule for {target.value} {value} on {platform}.")
        return
    added = _run(settings, lambda db: db.add_rule(action, target.value, platform, value, note))
    if added:
        _say(f"Added: {action} {target.value} {value} on {platform}.")
    else:
        _say(f"Already there: {action} {target.value} {value} on {platform}.")


@admin_app.command("allow")
def allow(
    target: Annotated[Target, typer.Argument(help="user | channel | workspace")],
    value: Annotated[str, typer.Argument(help="the id")],
    platform: PlatformOption,
    note: Annotated[str | None, typer.Option("--note", help="why (shown by `admin list`)")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="delete this rule instead")] = False,
    config: ConfigOption = None,
) -> None:
    """Allow-list a user, channel or workspace. Once one allow rule exists for a kind, only listed ones pass."""
    _rule("allow", target, value, platform, note, remove, config)


@admin_app.command("deny")
def deny(
    target: Annotated[Target, typer.Argument(help="user | channel | workspace")],
    value: Annotated[str, typer.Argument(help="the id")],
    platform: PlatformOption,
    note: Annotated[str | None, typer.Option("--note", help="why (shown by `admin list`)")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="delete this rule instead")] = False,
    config: ConfigOption = None,
) -> None:
    """Block a user, channel or workspace (a deny rule always wins over allow rules)."""
    _rule("deny", target, value, platform, note, remove, config)


@admin_app.command("list")
def list_rules(
    platform: Annotated[str | None, typer.Option("--platform", "-p")] = None,
    config: ConfigOption = None,
) -> None:
    """The access rules (allow/deny lists)."""
    settings = _settings(config)
    rules = _run(settings, lambda db: db.rules(platform))
    if not rules:
        _say("No access rules: everyone may use the bot.")
        return
    table = Table(title="access rules")
    for column in ("action", "target", "platform", "value", "note", "added"):
        table.add_column(column, overflow="fold")
    for r in rules:
        _add(table, r.action, r.target, r.platform, r.value, r.note or "", _when(r.created_at))
    _say(table)


# ---------------------------------------------------------------------------- conversations


def _shorten(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


@conversations_app.command("list")
def conversations_list(
    platform: Annotated[str | None, typer.Option("--platform", "-p")] = None,
    workspace: Annotated[str | None, typer.Option("--workspace", "-w")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    config: ConfigOption = None,
) -> None:
    """The most recently active conversations with their turn counts."""
    settings = _settings(config)
    rows = _run(settings, lambda db: db.list_conversations(platform=platform, workspace=workspace, limit=limit))
    if not rows:
        _say("No conversations stored.")
        return
    table = Table(title="conversations (most recent first)")
    for column in ("id", "platform", "workspace", "channel", "thread", "preset", "turns", "updated", "archived"):
        table.add_column(column, overflow="fold")
    for conv, count in rows:
        _add(
            table,
            str(conv.id),
            conv.platform,
            conv.workspace,
            conv.channel,
            conv.thread,
            conv.preset or "-",
            str(count),
            _when(conv.updated_at),
            _when(conv.archived_at),
        )
    _say(table)


@conversations_app.command("show")
def conversations_show(
    conversation_id: Annotated[int, typer.Argument(metavar="ID", help="conversation id (see `conversations list`)")],
    width: Annotated[int, typer.Option("--width", min=10, help="characters of text shown per turn")] = 80,
    config: ConfigOption = None,
) -> None:
    """One conversation's turns as a table (text shortened; `export` has it in full)."""
    settings = _settings(config)

    async def work(db: Database) -> tuple[Any, list[Any], dict[int, dict[str, Any]]]:
        conv = await db.get_conversation(conversation_id)
        if conv is None:
            return None, [], {}
        turns = await db.turns(conversation_id)
        return conv, turns, await db.image_info([t.image_id for t in turns if t.image_id is not None])

    conv, turns, images = _run(settings, work)
    if conv is None:
        _fail(f"No conversation {conversation_id}.")
    state = f"archived {_when(conv.archived_at)}" if conv.archived_at else "live"
    _say(
        f"conversation {conv.id}: {conv.platform}/{conv.workspace} channel {conv.channel} thread {conv.thread} "
        f"preset {conv.preset or '-'}, created {_when(conv.created_at)}, {state}",
    )
    table = Table()
    for column in ("seq", "role", "user", "status", "tokens in/out", "image", "text", "at"):
        table.add_column(column, overflow="fold")
    for t in turns:
        image = images.get(t.image_id) if t.image_id is not None else None
        _add(
            table,
            str(t.seq),
            t.role,
            t.user_id or "",
            t.status + (f" ({t.finish_reason})" if t.finish_reason and t.finish_reason != t.status else ""),
            f"{t.prompt_tokens}/{t.completion_tokens}" if t.role == "assistant" else "",
            image["sha256"][:12] if image else "",
            _shorten(t.error or t.text, width) if t.status == "failed" and t.error else _shorten(t.text, width),
            _when(t.created_at),
        )
    _say(table if turns else "(no turns)")


def _conversation_document(conv: Any, turns: list[Any], images: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": conv.id,
        "platform": conv.platform,
        "workspace": conv.workspace,
        "channel": conv.channel,
        "thread": conv.thread,
        "preset": conv.preset,
        "created_at": _iso(conv.created_at),
        "updated_at": _iso(conv.updated_at),
        "archived_at": _iso(conv.archived_at),
        "turns": [
            {
                "seq": t.seq,
                "role": t.role,
                "user_id": t.user_id,
                "text": t.text,
                "image": images.get(t.image_id) if t.image_id is not None else None,
                "status": t.status,
                "finish_reason": t.finish_reason,
                "error": t.error,
                "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens,
                "ttft_ms": t.ttft_ms,
                "duration_ms": t.duration_ms,
                "created_at": _iso(t.created_at),
            }
            for t in turns
        ],
    }


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
    settings = _settings(config)
    if (conversation_id is None) == (not export_all):
        _fail("give a conversation ID or --all (not both)", 2)

    async def work(db: Database) -> list[dict[str, Any]] | None:
        ids = await db.conversation_ids() if export_all else [conversation_id]
        documents = []
        for cid in ids:
            conv = await db.get_conversation(cid)
            if conv is None:
                return None
            turns = await db.turns(cid)
            images = await db.image_info([t.image_id for t in turns if t.image_id is not None])
            documents.append(_conversation_document(conv, turns, images))
        return documents

    documents = _run(settings, work)
    if documents is None:
        _fail(f"No conversation {conversation_id}.")
    if output is ExportFormat.jsonl:
        sys.stdout.write("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents))
    else:
        sys.stdout.write(json.dumps(documents, ensure_ascii=False, indent=2) + "\n")


@conversations_app.command("purge")
def conversations_purge(
    older_than_days: Annotated[int, typer.Option("--older-than-days", min=1, help="not active for N days")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    config: ConfigOption = None,
) -> None:
    """Delete conversations (turns, and images no longer used) not active for N days. Usage history stays."""
    settings = _settings(config)

    async def count_old(db: Database) -> tuple[datetime, int]:
        cutoff = db.now() - timedelta(days=older_than_days)  # the database's clock, as the bot uses
        return cutoff, await db.count_conversations_before(cutoff)

    cutoff, count = _run(settings, count_old)
    if not count:
        _say(f"No conversations inactive since {cutoff:%Y-%m-%d %H:%M} UTC.")
        return
    if not yes and not typer.confirm(
        f"Delete {count} conversation(s) inactive since {cutoff:%Y-%m-%d %H:%M} UTC, with their turns and images?"
    ):
        _say("Nothing deleted.")
        raise typer.Exit(1)
    purged = _run(settings, lambda db: db.purge_conversations(cutoff))
    _say(f"Deleted {purged} conversation(s); the usage ledger is kept.")


# ---------------------------------------------------------------------------- schema


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Option("--revision", help="target revision")] = "head",
    config: ConfigOption = None,
) -> None:
    """Create or update the schema on the configured database (safe to run again)."""
    settings = _settings(config)
    url = _database_url(settings)
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from storage import migrate

    try:
        before = migrate.current(url)
        after = migrate.upgrade(url, revision)
    except (SQLAlchemyError, OSError, TimeoutError, ValueError, CommandError, migrate.SchemaMismatch) as exc:
        _fail(f"Migration failed ({_safe_url(url)}): {_describe(exc)}")
    if before == after:
        _say(f"Database {_safe_url(url)} is at revision {after} (nothing to do).")
    else:
        _say(f"Database {_safe_url(url)} upgraded from {before or 'empty'} to revision {after}.")


@db_app.command("current")
def db_current(config: ConfigOption = None) -> None:
    """The schema revision of the configured database and the newest one available."""
    settings = _settings(config)
    url = _database_url(settings)
    from sqlalchemy.exc import SQLAlchemyError

    from storage import migrate

    try:
        revision = migrate.current(url)
    except (SQLAlchemyError, OSError, TimeoutError, ValueError) as exc:
        _fail(f"Database error ({_safe_url(url)}): {_describe(exc)}")
    head = migrate.head()
    state = "up to date" if revision == head else "run `minigpt4-bot admin db upgrade`"
    _say(f"Database {_safe_url(url)}: revision {revision or 'none'}, newest {head} ({state}).")
