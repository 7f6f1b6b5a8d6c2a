"""The slash commands (``/ask``, ``/reset``, ``/help``, ``/settings``) and registering them only when they changed.

Discord rate-limits command registration (200 creates a day per server), so the front end never overwrites
the commands on every start: :func:`sync_if_changed` fetches what is registered (globally, or in each of
``[discord] guild_ids``), compares it with the local definitions field by field (what Discord adds — ids,
versions, defaults — is ignored) and syncs only where they differ.  The ``/ask preset:`` choices are the
core's presets, so editing ``[presets]`` changes the definitions and the next start registers them once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import discord
from discord import app_commands

from bot.core.frontend_api import ImageLimits, PresetInfo

__all__ = ["MAX_CHOICES", "CommandHandlers", "add_commands", "normalized", "sync_if_changed"]

log = logging.getLogger(__name__)

MAX_CHOICES = 25  # Discord's limit on the choices of one option


class CommandHandlers(Protocol):
    async def on_ask(
        self, interaction: discord.Interaction, image: discord.Attachment, question: str, preset: str | None
    ) -> None: ...

    async def on_reset(self, interaction: discord.Interaction) -> None: ...

    async def on_help(self, interaction: discord.Interaction) -> None: ...

    async def on_settings(self, interaction: discord.Interaction) -> None: ...


def _short(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def add_commands(
    tree: app_commands.CommandTree, handlers: CommandHandlers, presets: Sequence[PresetInfo], images: ImageLimits
) -> None:
    """Add the four commands to ``tree``; ``/ask preset:`` offers ``presets`` (the first 25), ``/ask image:``
    names the formats the core reads (``images``:
    :attr:`Core.image_limits <bot.core.frontend_api.Core.image_limits>`)."""
    if len(presets) > MAX_CHOICES:
        log.warning("Discord offers at most %d presets in /ask; the others can still be named in the question",
                    MAX_CHOICES)  # fmt: skip

    async def ask(
        interaction: discord.Interaction,
        image: discord.Attachment,
        question: str | None = None,
        preset: str | None = None,
    ) -> None:
        await handlers.on_ask(interaction, image, question or "", preset)

    ask_command = app_commands.Command(
        name="ask",
        description="Ask about a picture: the answer appears here, follow up in its thread",
        callback=ask,
    )
    app_commands.describe(
        image=_short(f"The picture ({images.formats_text()})"),
        question="What you want to know (optional: a bare picture gets described)",
        preset="A ready-made prompt; your question is added to it",
    )(ask_command)
    choices = [app_commands.Choice(name=_short(f"{p.name} — {p.prompt}"), value=p.name[:100])
               for p in presets[:MAX_CHOICES]]  # fmt: skip
    if choices:
        app_commands.choices(preset=choices)(ask_command)
    tree.add_command(ask_command)

    async def reset(interaction: discord.Interaction) -> None:
        await handlers.on_reset(interaction)

    async def help(interaction: discord.Interaction) -> None:
        await handlers.on_help(interaction)

    async def settings(interaction: discord.Interaction) -> None:
        await handlers.on_settings(interaction)

    for callback, description in (
        (reset, "Start this thread's conversation over (the next picture and question begin anew)"),
        (help, "What I can do and how to ask"),
        (settings, "The model, the presets and your limits"),
    ):
        tree.add_command(app_commands.Command(name=callback.__name__, description=description, callback=callback))


# ---------------------------------------------------------------------- comparing with what is registered


def _option(option: dict[str, Any]) -> dict[str, Any]:
    choices = option.get("choices") or []
    return {
        "type": int(option.get("type", 3)),
        "name": option.get("name"),
        "description": option.get("description", ""),
        "required": bool(option.get("required", False)),
        "choices": [(c.get("name"), c.get("value")) for c in choices],
        "autocomplete": bool(option.get("autocomplete", False)),
        "channel_types": sorted(option.get("channel_types") or []),
        "limits": tuple(option.get(k) for k in ("min_value", "max_value", "min_length", "max_length")),
        "options": [_option(o) for o in option.get("options") or []],
    }


def normalized(command: dict[str, Any], *, contexts: bool = True) -> dict[str, Any]:
    """The fields of a command payload that define it, with Discord's defaults filled in.

    ``contexts``: compare ``contexts``/``integration_types`` too (only where the local definition sets them).
    """
    permissions = command.get("default_member_permissions")
    found = {
        "type": int(command.get("type", 1)),
        "name": command.get("name"),
        "description": command.get("description", ""),
        "options": [_option(o) for o in command.get("options") or []],
        "nsfw": bool(command.get("nsfw", False)),
        "default_member_permissions": None if permissions is None else str(permissions),
    }
    if contexts:
        found["contexts"] = sorted(command.get("contexts") or [])
        found["integration_types"] = sorted(command.get("integration_types") or [])
    return found


def _remote_payload(command: app_commands.AppCommand) -> dict[str, Any]:
    data: dict[str, Any] = dict(command.to_dict())
    data["nsfw"] = command.nsfw
    permissions = command.default_member_permissions
    data["default_member_permissions"] = None if permissions is None else permissions.value
    return data


def differences(local: list[dict[str, Any]], remote: list[dict[str, Any]]) -> list[str]:
    """What differs between the local command payloads and the registered ones (names), [] when in step."""
    mine = {c["name"]: c for c in local}
    theirs = {c.get("name"): c for c in remote}
    changed = sorted(set(mine) ^ set(theirs))
    for name in sorted(set(mine) & set(theirs)):
        ours = mine[name]
        with_contexts = ours.get("contexts") is not None or ours.get("integration_types") is not None
        if normalized(ours, contexts=with_contexts) != normalized(theirs[name], contexts=with_contexts):
            changed.append(name)
    return changed


async def sync_if_changed(tree: app_commands.CommandTree, guild_ids: Sequence[int]) -> dict[str, list[str]]:
    """Register the tree's commands where they differ from what Discord has; returns {scope: changed names}.

    ``guild_ids`` empty: the global commands; else each of these servers (the global definitions copied there).
    A scope that cannot be read or written is logged (one line with the fix) and skipped: mentions and DMs
    still work without slash commands.
    """
    synced: dict[str, list[str]] = {}
    scopes: list[discord.Object | None] = [discord.Object(g) for g in guild_ids] or [None]
    for guild in scopes:
        where = "globally" if guild is None else f"in server {guild.id}"
        if guild is not None:
            tree.copy_global_to(guild=guild)
        local = [command.to_dict(tree) for command in tree.get_commands(guild=guild)]
        try:
            remote = [_remote_payload(c) for c in await tree.fetch_commands(guild=guild)]
            changed = differences(local, remote)
            if not changed:
                log.info("Discord: slash commands %s are up to date (not re-registered)", where)
                continue
            await tree.sync(guild=guild)
        except discord.Forbidden:
            log.error("Discord: cannot register slash commands %s: invite the bot with the applications.commands "
                      "scope (docs/discord.md, the invite URL)", where)  # fmt: skip
            continue
        except discord.HTTPException as exc:
            log.error("Discord: registering slash commands %s failed: HTTP %s %s", where, exc.status, exc.text[:200])
            continue
        log.info("Discord: registered slash commands %s (changed: %s)", where, ", ".join(changed))
        synced["global" if guild is None else str(guild.id)] = changed
    return synced
