"""``minigpt4-bot admin keys create|list|revoke``: the API keys of the HTTP API front ends (``openai``).

A key stands for one user of one workspace on its platform, so quotas (``admin quota``), access rules
(``admin allow|deny``) and usage reports see an API user exactly as they see a Slack user.  The key is
printed once, by ``create``; the database keeps only its SHA-256 (:meth:`storage.Database.create_api_key`),
and nothing here logs it.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from bot.cli.admin._common import add_row, fail, known_platform, run, say, settings_for, when
from bot.cli.common import ConfigOption
from bot.core.requests import normalize_id, normalize_user

__all__ = ["keys_app"]

keys_app = typer.Typer(help="API keys for the OpenAI-compatible API: create, list, revoke.", no_args_is_help=True)

KeyPlatformOption = Annotated[
    str, typer.Option("--platform", "-p", help="the API front end the key is for", callback=known_platform)
]


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option("--user", "-u", help="who the key stands for (quotas, rules, usage)")],
    workspace: Annotated[str, typer.Option("--workspace", "-w", help="the workspace its usage counts in")] = "default",
    note: Annotated[str | None, typer.Option("--note", help="what it is for (shown by `keys list`)")] = None,
    platform: KeyPlatformOption = "openai",
    config: ConfigOption = None,
) -> None:
    """Make a key and print it once (only its hash is stored: a lost key is revoked and made again)."""
    settings = settings_for(config)
    user_id, space = normalize_user(platform, user), normalize_id(workspace)
    if not user_id or not space:
        fail("--user and --workspace must not be empty")
    row, key = run(settings, lambda db: db.create_api_key(platform, space, user_id, note))
    say(f"Key {row.id} for user {user_id} in workspace {space} on {platform} — shown only now, keep it secret:")
    say(key)


def _keys_table() -> Table:
    """Fits 80 columns: ids and times never wrap, the user/workspace column and the note fold."""
    shown = Table(title=Text("API keys (no secrets are stored)"))
    shown.add_column("id", no_wrap=True, justify="right")
    shown.add_column("key", no_wrap=True)
    shown.add_column("user @ workspace", overflow="fold", min_width=10)
    shown.add_column("created", no_wrap=True)
    shown.add_column("last used", no_wrap=True)
    shown.add_column("state", no_wrap=True)
    shown.add_column("note", overflow="fold", min_width=6)
    return shown


@keys_app.command("list")
def keys_list(
    platform: Annotated[str | None, typer.Option("--platform", "-p", callback=known_platform)] = None,
    config: ConfigOption = None,
) -> None:
    """Every key with whose it is, when it was made and last used, and whether it is revoked (never the key)."""
    settings = settings_for(config)
    rows = run(settings, lambda db: db.api_keys(platform))
    if not rows:
        say("No API keys: make one with `minigpt4-bot admin keys create --user NAME`.")
        return
    shown = _keys_table()
    for r in rows:
        state = "revoked" if r.revoked_at else "active"
        owner = f"{r.user_id} @ {r.workspace}" + ("" if r.platform == "openai" else f" ({r.platform})")
        add_row(shown, r.id, f"…{r.key_id[-6:]}", owner, when(r.created_at)[:10], when(r.last_used_at), state,
                r.note or "")  # fmt: skip
    say(shown)


@keys_app.command("revoke")
def keys_revoke(
    key_ref: Annotated[str, typer.Argument(metavar="ID", help="the key's id (see `keys list`) or its 12-digit key id")],
    config: ConfigOption = None,
) -> None:
    """Refuse a key from now on (its row stays, marked revoked, so the list still says whose it was)."""
    settings = settings_for(config)
    ref: int | str = int(key_ref) if key_ref.isdecimal() and len(key_ref) < 12 else key_ref
    row = run(settings, lambda db: db.revoke_api_key(ref))
    if row is None:
        fail(f"No API key {key_ref}: see `minigpt4-bot admin keys list`.")
    say(f"Revoked key {row.id} of user {row.user_id} in workspace {row.workspace} on {row.platform}.")
