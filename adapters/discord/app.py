"""The Discord front end (discord.py ``Client`` + ``app_commands``): its listeners and lifecycle.

* ``/ask image: question: [preset:]`` is deferred at once (before any download or queueing), answered in the
  original response — streamed, continued in follow-ups when long — and a thread is started on the response
  when the answer begins; messages in that thread continue the conversation without a mention.  ``/reset``
  (in a thread or a DM), ``/help`` and ``/settings`` (only to the asker) complete the commands — their
  handlers are :class:`~adapters.discord.commands.SlashCommands`, each a typed command for the core.
* ``@minigpt4 question`` with a picture in a channel answers in a thread started on that message (a reply
  where threads are not allowed); any message in a conversation thread continues it, and a picture posted
  in a thread the bot was addressed in (e.g. after ``reset``) starts one — also after a restart.  DMs need
  no mention.  Messages of bots (this one included) and webhooks, and system messages, are ignored.
* Conversations: platform ``discord``, workspace = the server id (DMs: ``dm``), channel = the parent
  channel id, thread = the thread id — which is the id of the message the thread was started from, so an
  answer is keyed by its thread before the thread exists.  A DM is one conversation (thread = the DM
  channel id; ``reset`` starts it over).  The event id is the message or interaction id: the core drops a
  gateway replay.  ``roles`` are the author's server role ids (without ``@everyone``; none in a DM), for the
  core's ``role`` access rules.
* Answers stream through :class:`~adapters.streaming.StreamedReply`: edits at most once per
  ``update_interval_s`` per message and within a per-channel edit budget; discord.py waits out 429s.
* The token comes from ``DISCORD_BOT_TOKEN`` only.  A missing or rejected token, or the Message Content
  intent not enabled for the application, stops ``start`` with one line saying where to fix it.

The front end uses nothing of the core but :class:`~bot.core.frontend_api.Core`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import discord
from discord import app_commands

from adapters.discord.commands import (
    DM_WORKSPACE,
    PLATFORM,
    Progress,
    SlashCommands,
    Where,
    add_commands,
    roles_of,
    sync_if_changed,
)
from adapters.discord.files import DiscordFiles
from adapters.discord.messages import (
    NO_MENTIONS,
    ChannelReply,
    discord_format,
    strip_mentions,
    thread_name,
)
from adapters.discord.settings import MESSAGE_LIMIT, DiscordSettings
from adapters.lifecycle import start_or_undo
from adapters.streaming import InFlight, StreamedReply, TokenBucket
from bot.core.frontend_api import Core, FrontEndSetupError
from bot.core.requests import Request, ThreadRef
from bot.core.shutdown import close_quietly

__all__ = ["INTENTS_NOTE", "PERMISSIONS", "PLATFORM", "TOKEN_ENV", "DiscordFrontEnd", "DiscordToken"]

log = logging.getLogger(__name__)

TOKEN_ENV = "DISCORD_BOT_TOKEN"
EDITS_PER_MINUTE = 50  # per channel, shared by every answer streaming there (Discord: ~5 edits / 5 s a channel)
PORTAL = "Developer Portal (https://discord.com/developers/applications) → your application → Bot"
INTENTS_NOTE = (
    "Discord: intents guilds, guild_messages, direct_messages and message_content (privileged). Without "
    "Message Content, messages that do not mention the bot arrive empty: thread follow-ups without a mention "
    "and pictures posted in threads stop working; mentions, DMs and slash commands still work"
)
PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    read_message_history=True,
    attach_files=True,
)
ANSWER_TYPES = (discord.MessageType.default, discord.MessageType.reply)


@dataclass(frozen=True)
class DiscordToken:
    """The bot token from the environment; never logged (hidden from ``repr``)."""

    value: str = field(repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> DiscordToken:
        value = environ.get(TOKEN_ENV, "").strip()
        if not value:
            raise FrontEndSetupError(
                f"{TOKEN_ENV} is not set: copy the bot token from the {PORTAL} → Reset Token into the environment"
            )
        if value.lower().startswith("bot "):
            value = value[4:].strip()
        return cls(value)


class _Client(discord.Client):
    """discord.py's client, with its events passed on to the front end."""

    def __init__(self, front: DiscordFrontEnd, **options: Any) -> None:
        super().__init__(**options)
        self.front = front

    async def on_connect(self) -> None:
        self.front._set_connected(True)

    async def on_resumed(self) -> None:
        self.front._set_connected(True)

    async def on_disconnect(self) -> None:
        self.front._set_connected(False)

    async def on_message(self, message: discord.Message) -> None:
        await self.front.on_message(message)


def _intents() -> discord.Intents:
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True
    return intents


class DiscordFrontEnd:
    """The discord.py client, its commands and listeners.  Building it does nothing; :meth:`start` reads
    ``DISCORD_BOT_TOKEN`` from ``environ``, logs in, registers the slash commands if they changed, and
    returns once the gateway session is up.
    """

    name = PLATFORM
    token_margin = datetime.timedelta(seconds=60)  # no interaction call this close to the token's end

    def __init__(
        self,
        core: Core,
        settings: DiscordSettings,
        *,
        environ: Mapping[str, str] = os.environ,
        connect_timeout_s: float = 60.0,
    ) -> None:
        self.core, self.settings, self.environ, self.connect_timeout_s = core, settings, environ, connect_timeout_s
        self.client: _Client | None = None
        self.tree: app_commands.CommandTree | None = None
        self.files = DiscordFiles(lambda: self.core.image_limits, settings.max_image_bytes)
        self.fmt = discord_format(min(settings.max_message_chars, MESSAGE_LIMIT))
        self._buckets: dict[str, TokenBucket] = {}
        self._in_flight = InFlight()
        self._gateway: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._stopped = False
        self._threads: dict[int, int | None] = {}  # channel id → parent id (a thread) or None, for uncached channels
        self._aliases: dict[int, str] = {}  # thread id → conversation key, should a thread not get its message's id
        self.commands = SlashCommands(self)  # /ask /reset /help /settings

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await start_or_undo(self._start(DiscordToken.from_env(self.environ)), self.stop)

    async def _start(self, token: DiscordToken) -> None:
        self._stopped = False
        self.client = _Client(
            self,
            intents=_intents(),
            max_messages=None,
            chunk_guilds_at_startup=False,
            member_cache_flags=discord.MemberCacheFlags.none(),
            allowed_mentions=NO_MENTIONS,
        )
        self.tree = app_commands.CommandTree(self.client)
        add_commands(self.tree, self.commands, self.core.presets(), self.core.image_limits)
        try:
            await asyncio.wait_for(self.client.login(token.value), self.connect_timeout_s)
        except discord.LoginFailure:
            raise FrontEndSetupError(
                f"Discord rejected {TOKEN_ENV} (401 Unauthorized): copy a new token from the {PORTAL} → Reset Token"
            ) from None
        except discord.HTTPException as exc:
            raise FrontEndSetupError(f"Discord answered HTTP {exc.status} to the login; try again later") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise FrontEndSetupError(
                f"cannot reach the Discord API ({type(exc).__name__}): check the network"
            ) from None
        user, application = self.client.user, self.client.application_id
        log.info("Discord: logged in as %s (user %s, application %s)", user, getattr(user, "id", "?"), application)
        if application is not None:
            invite = discord.utils.oauth_url(
                application, permissions=PERMISSIONS, scopes=("bot", "applications.commands")
            )
            log.info("Discord: invite the bot with %s", invite)
        log.info(INTENTS_NOTE)
        await sync_if_changed(self.tree, self.settings.guild_ids)
        self._gateway = asyncio.create_task(self.client.connect(reconnect=True), name="discord-gateway")
        ready = asyncio.create_task(self._connected.wait())
        try:
            done, _ = await asyncio.wait(
                {self._gateway, ready}, timeout=self.connect_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
        if self._gateway in done:
            raise self._gateway_error(self._gateway.exception() if not self._gateway.cancelled() else None)
        if not done:
            raise FrontEndSetupError(
                f"no Discord gateway session after {self.connect_timeout_s:.0f} s: check the network and the token"
            )
        self._gateway.add_done_callback(self._gateway_ended)
        log.info("Discord: gateway connected; slash commands /ask /reset /help /settings")

    @staticmethod
    def _gateway_error(exc: BaseException | None) -> FrontEndSetupError:
        if isinstance(exc, discord.PrivilegedIntentsRequired) or (
            isinstance(exc, discord.ConnectionClosed) and exc.code in (4013, 4014)
        ):
            return FrontEndSetupError(
                "Discord refused the Message Content intent: enable it in the "
                f"{PORTAL} → Privileged Gateway Intents → Message Content Intent"
            )
        if isinstance(exc, discord.ConnectionClosed) and exc.code == 4004:
            return FrontEndSetupError(
                f"Discord's gateway rejected {TOKEN_ENV} (4004): copy a new token from the {PORTAL} → Reset Token"
            )
        what = "no reason" if exc is None else type(exc).__name__
        if isinstance(exc, discord.ConnectionClosed):
            what += f" {exc.code}"
        return FrontEndSetupError(f"the Discord gateway closed the connection ({what})")

    def _gateway_ended(self, task: asyncio.Task[None]) -> None:
        """After start: the gateway gave up for good (a token reset, the intent switched off …) — say why, once."""
        if self._stopped or task.cancelled():
            return
        error = self._gateway_error(task.exception())
        log.error("discord: %s (see docs/discord.md); readiness reports it until the bot is restarted", error)

    async def stop(self) -> None:
        """Interrupt answers in flight (their messages say so), then close the gateway and the HTTP session."""
        self._stopped = True
        await self._in_flight.cancel_all()
        client, self.client = self.client, None
        await close_quietly(client.close if client is not None else None)
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(gateway, 10)
        self._connected.clear()

    async def problem(self) -> str | None:
        """``None`` while the gateway session is up, else one line for readiness checks (no Discord call)."""
        if self.client is None:
            return "Discord: stopped" if self._stopped else "Discord: not started"
        if self._gateway is not None and self._gateway.done():
            return "Discord gateway closed for good (see the log; restart the bot)"
        if not self._connected.is_set():
            return "Discord gateway disconnected (reconnecting)"
        return None

    def _set_connected(self, up: bool) -> None:
        if up:
            self._connected.set()
        else:
            self._connected.clear()

    def bucket(self, channel: str) -> TokenBucket:
        """The channel's edit budget, shared by every answer streaming there."""
        if channel not in self._buckets:
            self._buckets[channel] = TokenBucket(EDITS_PER_MINUTE, burst=5)
        return self._buckets[channel]

    def _stream(self, messages: Any, channel: str) -> StreamedReply:
        return StreamedReply(messages, self.bucket(channel), self.fmt, interval_s=self.settings.update_interval_s)

    # ------------------------------------------------------------------ messages

    def _addressed(self, message: discord.Message) -> bool:
        me = self.client.user if self.client is not None else None
        if me is None:
            return False
        if any(user.id == me.id for user in message.mentions):
            return True
        role = message.guild.self_role if message.guild is not None else None
        return role is not None and role.id in message.raw_role_mentions

    def _thread_key(self, thread_id: int) -> str:
        return self._aliases.get(thread_id) or str(thread_id)

    def _thread_started(self, thread: discord.Thread, source_id: int) -> None:
        """Discord gives a thread started from a message that message's id; should it not, remember the key."""
        if thread.id != source_id:
            log.warning("Discord: thread %s started from message %s has another id; keeping the key in memory",
                        thread.id, source_id)  # fmt: skip
            self._aliases[thread.id] = str(source_id)

    async def _parent_of(self, channel: Any) -> int | None:
        """The parent channel id when ``channel`` is a thread (looked up once when discord.py has not cached it)."""
        if isinstance(channel, discord.Thread):
            return channel.parent_id
        if not isinstance(channel, discord.PartialMessageable) or self.client is None:
            return None
        if channel.id not in self._threads:
            try:
                fetched = await self.client.fetch_channel(channel.id)
            except (discord.DiscordException, aiohttp.ClientError, OSError) as exc:
                log.warning("Discord: cannot look up channel %s: %s", channel.id, type(exc).__name__)
                return None
            if len(self._threads) > 10_000:
                self._threads.clear()
            self._threads[channel.id] = fetched.parent_id if isinstance(fetched, discord.Thread) else None
        return self._threads[channel.id]

    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or message.webhook_id is not None or message.type not in ANSWER_TYPES:
            return  # bots (this one too), webhooks (interaction follow-ups), joins, pins, thread notices …
        if isinstance(message.channel, discord.DMChannel):
            channel = str(message.channel.id)
            where = Where(DM_WORKSPACE, channel, channel, message.channel)
            await self._answer(message, where, addressed=True)
            return
        guild_id = message.guild.id if message.guild is not None else getattr(message.channel, "guild_id", None)
        if guild_id is None:
            return  # a group DM: bots are never in one
        guild = str(guild_id)
        addressed = self._addressed(message)
        parent = await self._parent_of(message.channel)
        if parent is not None:
            where = Where(guild, str(parent), self._thread_key(message.channel.id), message.channel)
            if not addressed:
                view = await self.core.thread(ThreadRef(PLATFORM, guild, where.channel, where.thread or ""))
                if not (view.live or (message.attachments and view.followed)):
                    return  # chatter in a thread without a conversation
            await self._answer(message, where, addressed=addressed)
        elif addressed:
            can_thread = isinstance(message.channel, discord.TextChannel | discord.PartialMessageable)
            where = Where(guild, str(message.channel.id), None, message.channel, can_thread=can_thread)
            await self._answer(message, where, addressed=True)

    async def _answer(self, message: discord.Message, where: Where, *, addressed: bool) -> None:
        with self._in_flight.track():
            thread = where.thread or str(message.id)  # a thread started on the message will have its id
            log.info("discord message %s in %s/%s thread %s", message.id, where.workspace, where.channel, thread)
            me = self.client.user if self.client is not None else None
            role = message.guild.self_role if message.guild is not None else None
            text = strip_mentions(message.content, me.id if me else None, role.id if role else None)
            progress = Progress()
            reply = ChannelReply(
                message, new_thread=where.thread is None and where.can_thread, name=thread_name(text),
                answering=progress, on_thread=self._thread_started, interval_s=self.settings.update_interval_s,
            )  # fmt: skip
            images = await self.files.download(message.attachments)
            request = Request(
                PLATFORM, where.workspace, where.channel, thread, str(message.author.id), text, images,
                event_id=str(message.id), addressed=addressed, roles=roles_of(message.author),
            )  # fmt: skip
            await self._stream(reply, where.channel).run(progress.watch(self.core.handle(request)))
