"""The slash commands (``/ask``, ``/reset``, ``/help``, ``/settings``): their handlers (:class:`SlashCommands`,
each one a typed :class:`~bot.core.requests.Command` for the core), and registering them only when they changed.

Discord rate-limits command registration (200 creates a day per server), so the front end never overwrites
the commands on every start: :func:`sync_if_changed` fetches what is registered (globally, or in each of
``[discord] guild_ids``), compares it with the local definitions field by field (what Discord adds — ids,
versions, defaults — is ignored) and syncs only where they differ.  The ``/ask preset:`` choices are the
core's presets, so editing ``[presets]`` changes the definitions and the next start registers them once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import discord
from discord import app_commands

from adapters.discord.interaction_reply import TOKEN_LIFETIME, InteractionReply
from adapters.discord.messages import NO_MENTIONS, thread_name
from adapters.discord.settings import MESSAGE_LIMIT
from adapters.streaming import split_message
from bot.core.frontend_api import ImageLimits, PresetInfo
from bot.core.requests import Command, Delta, Final, ReplyEvent, Request

__all__ = [
    "DM_WORKSPACE",
    "MAX_CHOICES",
    "CommandHandlers",
    "Progress",
    "SlashCommands",
    "Where",
    "add_commands",
    "normalized",
    "roles_of",
    "sync_if_changed",
]

log = logging.getLogger(__name__)

MAX_CHOICES = 25  # Discord's limit on the choices of one option
PLATFORM = "discord"
DM_WORKSPACE = "dm"


@dataclass(frozen=True)
class Where:
    """A conversation's key parts; ``thread`` is ``None`` for a top-level channel (each answer its own thread)."""

    workspace: str
    channel: str
    thread: str | None
    messageable: Any
    can_thread: bool = False


def roles_of(author: discord.User | discord.Member) -> tuple[str, ...]:
    """The ids of the author's server roles, leaving out ``@everyone`` (every member has it); none in a DM.

    ``Member.roles`` holds the roles the cached server knows (the ``guilds`` intent keeps them current).
    """
    if not isinstance(author, discord.Member):
        return ()
    return tuple(str(role.id) for role in author.roles if not role.is_default())


class Progress:
    """Whether the core is answering (a model answer is streaming), as opposed to a notice or a refusal."""

    def __init__(self) -> None:
        self.answering = False

    def __call__(self) -> bool:
        return self.answering

    async def watch(self, events: AsyncIterator[ReplyEvent]) -> AsyncIterator[ReplyEvent]:
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for event in events:
                if isinstance(event, Delta) or (isinstance(event, Final) and event.kind == "answer"):
                    self.answering = True
                yield event


class SlashCommands:
    """The handlers of the four commands (:class:`CommandHandlers`) for a running front end (``front``: the
    :class:`~adapters.discord.app.DiscordFrontEnd`, whose core, client, streams and thread keys they use).
    Each one reaches the core as its typed command (``Request.command``): ``/ask``'s question is a question
    even when it is the word "settings"; ``/settings`` outside a thread names none (the core follows none)."""

    def __init__(self, front: Any) -> None:
        self.front = front

    def _where(self, interaction: discord.Interaction) -> Where:
        channel_id = interaction.channel_id or 0
        channel = interaction.channel
        if channel is None and self.front.client is not None:
            channel = self.front.client.get_partial_messageable(channel_id, guild_id=interaction.guild_id)
        if interaction.guild_id is None:
            return Where(DM_WORKSPACE, str(channel_id), str(channel_id), channel)
        guild = str(interaction.guild_id)
        if isinstance(channel, discord.Thread):
            return Where(guild, str(channel.parent_id), self.front._thread_key(channel.id), channel)
        can_thread = isinstance(channel, discord.TextChannel | discord.PartialMessageable)
        return Where(guild, str(channel_id), None, channel, can_thread=can_thread)

    async def _defer(self, interaction: discord.Interaction, *, ephemeral: bool = False) -> int | None:
        """Acknowledge within Discord's 3 s (before anything else); the original response's message id."""
        callback = None
        try:
            callback = await interaction.response.defer(thinking=True, ephemeral=ephemeral)
        except (discord.DiscordException, aiohttp.ClientError, OSError) as exc:
            log.warning("Discord: could not defer interaction %s (%s): it expired", interaction.id, type(exc).__name__)
            return None
        except (KeyError, TypeError, ValueError) as exc:  # acknowledged, but an unexpected callback body
            if not interaction.response.is_done():
                raise
            log.warning("Discord: unexpected answer to deferring %s (%s)", interaction.id, type(exc).__name__)
        message_id = getattr(callback, "message_id", None)
        if message_id is None:
            try:
                message_id = (await interaction.original_response()).id
            except (discord.DiscordException, aiohttp.ClientError, OSError) as exc:
                log.warning("Discord: no original response for %s (%s)", interaction.id, type(exc).__name__)
                return None
        return message_id

    def _expires(self, interaction: discord.Interaction, received: datetime.datetime) -> datetime.datetime:
        return min(interaction.created_at, received) + TOKEN_LIFETIME

    async def on_ask(
        self, interaction: discord.Interaction, image: discord.Attachment, question: str, preset: str | None
    ) -> None:
        """``/ask``: defer, download, answer in the response, thread on the response for follow-ups."""
        with self.front._in_flight.track():
            received = discord.utils.utcnow()
            original = await self._defer(interaction)
            if original is None:
                return
            where = self._where(interaction)
            thread = where.thread or str(original)  # the thread started on the response will have its id
            log.info("discord /ask %s in %s/%s thread %s", interaction.id, where.workspace, where.channel, thread)
            progress = Progress()
            reply = InteractionReply(
                interaction, original, channel=where.messageable, new_thread=where.thread is None and where.can_thread,
                name=thread_name(question, fallback=f"{preset or 'Picture'} question"), answering=progress,
                expires=self._expires(interaction, received), margin=self.front.token_margin,
                on_thread=self.front._thread_started, interval_s=self.front.settings.update_interval_s,
            )  # fmt: skip
            images = await self.front.files.download([image])
            request = Request(
                PLATFORM, where.workspace, where.channel, thread, str(interaction.user.id), question, images,
                event_id=str(interaction.id), preset=preset or None, addressed=True, roles=roles_of(interaction.user),
                command=Command.ASK,
            )  # fmt: skip
            try:
                await self.front._stream(reply, where.channel).run(progress.watch(self.front.core.handle(request)))
            finally:
                await asyncio.shield(reply.finish())

    async def on_reset(self, interaction: discord.Interaction) -> None:
        """``/reset``: the conversation of this thread (or DM) starts over."""
        with self.front._in_flight.track():
            received = discord.utils.utcnow()
            where = self._where(interaction)
            if where.thread is None:
                with contextlib.suppress(discord.DiscordException, aiohttp.ClientError, OSError):
                    await interaction.response.send_message(
                        "Use `/reset` inside a conversation thread (or in a DM with me): each `/ask` and each "
                        "mention starts its own thread.", ephemeral=True,
                    )  # fmt: skip
                return
            original = await self._defer(interaction)
            if original is None:
                return
            reply = InteractionReply(
                interaction, original, channel=where.messageable, new_thread=False, name="", answering=Progress(),
                expires=self._expires(interaction, received), margin=self.front.token_margin,
                interval_s=self.front.settings.update_interval_s,
            )  # fmt: skip
            request = Request(
                PLATFORM, where.workspace, where.channel, where.thread, str(interaction.user.id),
                event_id=str(interaction.id), addressed=True, roles=roles_of(interaction.user), command=Command.RESET,
            )  # fmt: skip
            try:
                await self.front._stream(reply, where.channel).run(self.front.core.handle(request))
            finally:
                await asyncio.shield(reply.finish())

    async def on_help(self, interaction: discord.Interaction) -> None:
        """``/help``: the core's help and what only Discord adds, to the asker alone."""
        with self.front._in_flight.track():
            chunks = split_message(self.help_text(), MESSAGE_LIMIT)
            try:
                await interaction.response.send_message(chunks[0], ephemeral=True, allowed_mentions=NO_MENTIONS)
                for chunk in chunks[1:]:
                    await interaction.followup.send(chunk, ephemeral=True, allowed_mentions=NO_MENTIONS)
            except (discord.DiscordException, aiohttp.ClientError, OSError) as exc:
                log.warning("Discord /help failed: %s", type(exc).__name__)

    async def on_settings(self, interaction: discord.Interaction) -> None:
        """``/settings``: the model, the presets and the asker's limits, to the asker alone."""
        with self.front._in_flight.track():
            if await self._defer(interaction, ephemeral=True) is None:
                return
            where = self._where(interaction)
            request = Request(
                PLATFORM, where.workspace, where.channel, where.thread or "", str(interaction.user.id),
                roles=roles_of(interaction.user), command=Command.SETTINGS,  # outside a thread: none (Request.command)
            )  # fmt: skip
            texts = [e.text async for e in self.front.core.handle(request) if isinstance(e, Final)]
            chunks = split_message(discord.utils.escape_markdown("\n".join(texts)), MESSAGE_LIMIT) or ["(nothing)"]
            try:
                await interaction.edit_original_response(content=chunks[0], allowed_mentions=NO_MENTIONS)
                for chunk in chunks[1:]:
                    await interaction.followup.send(chunk, ephemeral=True, allowed_mentions=NO_MENTIONS)
            except (discord.DiscordException, aiohttp.ClientError, OSError) as exc:
                log.warning("Discord /settings failed: %s", type(exc).__name__)

    def help_text(self) -> str:
        me = self.front.client.user if self.front.client is not None else None
        bot = f"<@{me.id}>" if me is not None else "the bot"
        return (
            discord.utils.escape_markdown(self.front.core.help_text()) + "\n\n**In Discord**\n"
            "• `/ask` with a picture, a question and (optionally) a preset: I answer there and open a thread on "
            "the answer — reply in the thread to follow up, no mention needed.\n"
            f"• Or mention {bot} with a picture in a channel: I answer in a thread started on your message.\n"
            "• In a DM, just send a picture and a question.\n"
            "• `/reset` in a thread (or a DM) starts it over; `/settings` shows the model and your limits."
        )


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

    ask_command: app_commands.Command[Any, ..., None] = app_commands.Command(
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
    theirs = {c["name"]: c for c in remote}  # Discord's registered commands always have a name
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
