"""``minigpt4-bot admin allow|deny|list``: the access rules (allow and deny lists).

``allow`` and ``deny`` are one command, :func:`rule_command`, made once per action; the targets are
:class:`Target` (how the kinds combine: :mod:`bot.core.access`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Annotated

import typer

from bot.cli.admin._common import (
    WIDE_HELP,
    PlatformOption,
    add_row,
    known_platform,
    run,
    say,
    settings_for,
    show_table,
    table,
    when,
)
from bot.cli.common import ConfigOption

__all__ = ["ACTIONS", "list_rules", "rule_command"]

ACTIONS = {
    "allow": (
        "Allow-list a user, channel, workspace or role. Once one allow rule exists for a kind, only listed ones "
        "pass (for roles: members with at least one listed role); every kind with allow rules must be satisfied."
    ),
    "deny": (
        "Block a user, channel, workspace or role (a deny rule always wins over allow rules; a member with any "
        "denied role is blocked)."
    ),
}
TARGET_HELP = (
    "what the id names. role: a server role on platforms that have them (Discord: Developer Mode → right-click "
    "the role → Copy Role ID); Slack has none. DMs have no roles: a role allow-list refuses them."
)


class Target(StrEnum):
    """What a rule matches: the request's user, channel or workspace id, or one of the author's role ids."""

    user = "user"
    channel = "channel"
    workspace = "workspace"
    role = "role"


def rule_command(action: str) -> Callable[..., None]:
    """The ``allow`` or ``deny`` command: add a rule, or remove it with ``--remove``."""

    def command(
        target: Annotated[Target, typer.Argument(help=TARGET_HELP)],
        value: Annotated[str, typer.Argument(help="the id")],
        platform: PlatformOption,
        note: Annotated[str | None, typer.Option("--note", help="why (shown by `admin list`)")] = None,
        remove: Annotated[bool, typer.Option("--remove", help="delete this rule instead")] = False,
        config: ConfigOption = None,
    ) -> None:
        settings = settings_for(config)
        rule = f"{action} {target.value} {value} on {platform}"
        if remove:
            removed = run(settings, lambda db: db.remove_rule(action, target.value, platform, value))
            outcome = "Removed" if removed else "There was no"
            say(f"{outcome} {action} rule for {target.value} {value} on {platform}.")
            return
        added = run(settings, lambda db: db.add_rule(action, target.value, platform, value, note))
        say(f"Added: {rule}." if added else f"Already there: {rule}.")

    command.__name__ = action
    command.__doc__ = ACTIONS[action]
    return command


def list_rules(
    platform: Annotated[str | None, typer.Option("--platform", "-p", callback=known_platform)] = None,
    wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False,
    config: ConfigOption = None,
) -> None:
    """The access rules (allow/deny lists), one line each.

    At 80 columns a long note, then a long id, ends in "…" (``--wide`` shows them whole); the rule, the
    platform and the day it was added are never cut.
    """
    settings = settings_for(config)
    rules = run(settings, lambda db: db.rules(platform))
    if not rules:
        say("No access rules: everyone may use the bot.")
        return
    shown = table("access rules", ("rule", "platform", "id", "note", "added (UTC)"))
    for r in rules:
        add_row(shown, f"{r.action} {r.target}", r.platform, r.value, r.note or "", when(r.created_at)[:10])
    show_table(shown, cut=("note", "id"), wide=wide)
