"""``minigpt4-bot admin quota show|set|reset``: limit overrides per user and per workspace.

The limits are the fields of :class:`~bot.core.config.QuotaLimits`: ``quota set`` gets one
``--<limit>`` option per field (``--requests-per-day`` …) and the tables one row or column per
field, so a new limit needs no change here.  The figures come from
:meth:`bot.core.quotas.QuotaPolicy.overview`, which the bot's own admission reads too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from bot.cli.admin._common import (
    WIDE_HELP,
    PlatformOption,
    UserOption,
    WorkspaceOption,
    add_row,
    fail,
    known_platform,
    run,
    say,
    settings_for,
    show_table,
    table,
    when,
)
from bot.cli.common import ConfigOption
from bot.core.config import QuotaLimits, Settings
from bot.core.quotas import LIMITS, QuotaPolicy
from bot.core.requests import normalize_id, normalize_user

if TYPE_CHECKING:
    from storage import Database

__all__ = ["quota_app"]

F = TypeVar("F", bound=Callable[..., Any])

MAX_LIMIT = 2**31 - 1  # the columns are 32-bit integers

LimitOption = Annotated[str | None, typer.Option(metavar="N|0|none", help="a limit; 0 = unlimited; none = default")]

quota_app = typer.Typer(
    help=(
        "Per-user and per-workspace limits. Values: a number; 0 = unlimited; none = back to the "
        "configured default (the quotas tables in bot.toml)."
    ),
    no_args_is_help=True,
)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _short(name: str) -> str:
    """The short column name of a limit (its field title in QuotaLimits, e.g. ``req/day``), on two lines at
    its "/" (``req/`` over ``day``) so that five limits leave room for the ids at 80 columns."""
    title = QuotaLimits.model_fields[name].title or name
    head, slash, tail = title.partition("/")
    return f"{head}/\n{tail}" if slash else title


def _scope(platform: str, workspace: str, user: str | None) -> tuple[str, str, str]:
    """(scope, workspace, user) spelled as the core stores requests' ids (``Q1`` and ``q1`` are one web
    user), so an override set here applies to the person it names."""
    workspace = normalize_id(workspace)
    return ("user", workspace, normalize_user(platform, user)) if user else ("workspace", workspace, "")


def _parse_limit(name: str, value: str) -> int | None:
    if value.strip().lower() in ("none", "default", ""):
        return None
    try:
        number = int(value)
    except ValueError:
        fail(f"{_option(name)}: expected a number, 0 (unlimited) or none (default), got {value!r}", 2)
    if number < 0:
        fail(f"{_option(name)}: must not be negative (0 = unlimited)", 2)
    if number > MAX_LIMIT:
        fail(f"{_option(name)}: at most {MAX_LIMIT:,} (use 0 for unlimited)", 2)
    return number


def _limit_text(value: int | None) -> str:
    if value is None:
        return "-"
    return "unlimited" if value == 0 else f"{value:,}"


def _with_limit_options(command: F) -> F:
    """Give ``command(..., **limits)`` one ``--<limit>`` option per QuotaLimits field, just before ``--config``.

    typer reads a command's parameters from its signature, so the signature is rewritten; the
    options reach the command as keyword arguments named after the fields.
    """
    signature = inspect.signature(command, eval_str=True)
    keyword = inspect.Parameter.KEYWORD_ONLY
    fixed = [p.replace(kind=keyword) for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    limits = [inspect.Parameter(n, keyword, default=None, annotation=LimitOption) for n in LIMITS]
    at = [p.name for p in fixed].index("config")
    command.__signature__ = signature.replace(parameters=[*fixed[:at], *limits, *fixed[at:]])  # type: ignore[attr-defined]
    return command


@quota_app.command("show")
def quota_show(
    platform: Annotated[
        str | None, typer.Option("--platform", "-p", help="with --workspace: one scope", callback=known_platform)
    ] = None,
    workspace: Annotated[str | None, typer.Option("--workspace", "-w")] = None,
    user: UserOption = None,
    wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False,
    config: ConfigOption = None,
) -> None:
    """Stored overrides and usage today / this month (UTC). Without --platform/--workspace: every override."""
    settings = settings_for(config)
    if (platform is None) != (workspace is None):
        fail("give both --platform and --workspace (or neither, to list every override)", 2)
    if user is not None and platform is None:
        fail("--user needs --platform and --workspace", 2)
    if platform is None or workspace is None:
        _show_overrides(settings, wide)
        return
    _, workspace, user = _scope(platform, workspace, user)
    user = user or None

    overview = run(settings, lambda db: QuotaPolicy(settings.quotas, db).overview(platform, workspace, user))
    for scope in overview.scopes:
        where = f"{platform}/{workspace}"
        title = f"user {scope.who} in {where}" if scope.scope == "user" else f"workspace {where}"
        shown = table(
            f"{title} (usage since {overview.day:%Y-%m-%d} / {overview.month:%Y-%m} UTC)",
            ("limit", "default", "override", "effective", "used"),
            right=("default", "override", "effective", "used"),
        )
        for line in scope.lines:
            limits = (_limit_text(v) for v in (line.default, line.override, line.effective))
            add_row(shown, line.name, *limits, f"{line.used:,}")
        say(shown)
        if not scope.overridden:
            say(f"no stored override for this {scope.scope}: the configured defaults apply")


def _show_overrides(settings: Settings, wide: bool) -> None:
    """Every stored override, one line each.  On a narrow terminal the update day is left out, then long
    workspace and user ids end in "…" (``--wide`` shows everything whole); the limits are never cut."""
    rows = run(settings, lambda db: db.list_quotas())
    if not rows:
        say("No quota overrides: the configured defaults apply to everyone.")
        return
    names = list(LIMITS)
    shown = table(
        "quota overrides (user *: the workspace's own; 0 = unlimited, - = default)",
        ("platform/\nworkspace", "user", *map(_short, names), "updated"),
        right=tuple(map(_short, names)),
    )
    for row in rows:
        limits = ("0" if getattr(row, name) == 0 else _limit_text(getattr(row, name)) for name in names)
        where = f"{row.platform}/{row.workspace}"
        add_row(shown, where, row.user_id or "*", *limits, when(row.updated_at)[:10])
    show_table(shown, cut=[("platform/\nworkspace", "user")], optional=["updated"], wide=wide)


@quota_app.command("set")
@_with_limit_options
def quota_set(
    platform: PlatformOption,
    workspace: WorkspaceOption,
    user: UserOption = None,
    config: ConfigOption = None,
    **given: str | None,
) -> None:
    """Override limits for a user (--user) or a whole workspace. N = the limit, 0 = unlimited, none = default.

    Limits not named keep their current value. Days and months are UTC calendar days and months.
    """
    settings = settings_for(config)
    names = list(LIMITS)
    limits = {name: _parse_limit(name, value) for name in names if (value := given.get(name)) is not None}
    if not limits:
        fail(f"name at least one limit, e.g. {_option(names[0])} 50 (0 = unlimited, none = default)", 2)
    scope, workspace, who = _scope(platform, workspace, user)

    async def work(db: Database) -> Any:
        await db.set_quota(scope, platform, workspace, who, **limits)
        return await db.quota_setting(scope, platform, workspace, who)

    row = run(settings, work)
    summary = ", ".join(f"{name} = {_limit_text(getattr(row, name))}" for name in names)
    target = f"user {who}" if who else "workspace"
    say(f"Quota for {target} in {platform}/{workspace}: {summary}")


@quota_app.command("reset")
def quota_reset(
    platform: PlatformOption,
    workspace: WorkspaceOption,
    user: UserOption = None,
    config: ConfigOption = None,
) -> None:
    """Remove the stored override: the configured defaults apply again."""
    settings = settings_for(config)
    scope, workspace, who = _scope(platform, workspace, user)
    removed = run(settings, lambda db: db.reset_quota(scope, platform, workspace, who))
    target = f"user {who}" if who else "workspace"
    if removed:
        say(f"Removed the quota override for {target} in {platform}/{workspace}.")
    else:
        say(f"No quota override stored for {target} in {platform}/{workspace}.")
