"""A stateful fake Discord on loopback, driven only through the real discord.py client.

discord.py has no base-URL setting; the tests point it here through its two public class attributes,
``discord.http.Route.BASE`` (REST, interaction callbacks and webhooks) and
``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`` (see :meth:`FakeDiscord.routed`, which restores both).
One aiohttp server on ``127.0.0.1:<free port>`` serves:

``/api/v10/...``   the REST routes discord.py calls for the bot: ``users/@me``, ``oauth2/applications/@me``;
                   global and guild application commands (GET, bulk PUT — counted, 200 creates a day);
                   interaction callbacks (type 5 / 4 within 3 s of delivery, once; ``?with_response=1``
                   answered with ``{interaction, resource}``); the interaction webhook (``@original`` GET /
                   PATCH / DELETE, follow-ups, their edits — the token dies 15 minutes after the interaction's
                   snowflake time: 401 ``Invalid Webhook Token``); channel messages (post, edit, delete, with
                   ``message_reference`` and ``allowed_mentions`` recorded; over 2,000 characters or empty is
                   400 ``50035``/``50006``; files as multipart ``payload_json`` + ``files[n]``, 10 MiB each, 403
                   without Attach Files; only the bot's own non-webhook messages can be edited); starting a
                   thread from a message (the thread gets the message's id; once per message; 403 where threads
                   are forbidden); typing; ``GET channels/{id}``.  The bot token is required on bot routes
                   (else 401).  ``fail_next(route, n, retry_after)`` answers the next *n* calls of a route with a
                   real-looking 429 (``Via`` header, JSON ``retry_after``).  Responses are exactly
                   ``application/json`` (discord.py needs that).
``/gateway``       the websocket: HELLO → IDENTIFY (token checked: close 4004; the message_content intent
                   refused unless the application has it: close 4014) → READY + GUILD_CREATE; heartbeats ACKed;
                   zlib-stream transport compression when the client asks for it.  ``dispatch`` sends
                   MESSAGE_CREATE, INTERACTION_CREATE …; the bot's own messages come back as MESSAGE_CREATE and
                   new threads as THREAD_CREATE, as on Discord.  Server roles: ``add_role`` (in GUILD_CREATE's
                   ``roles``, or a GUILD_ROLE_CREATE once connected), ``member_roles`` (user id → role ids) —
                   a user's roles travel as ``member.roles`` in MESSAGE_CREATE and INTERACTION_CREATE.
``/cdn/...``       attachment bytes on signed, expiring URLs (``ex`` = expiry); expired → 404.

Every REST call is recorded in ``calls`` (method, route, JSON body, time, status).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
import discord.gateway
import discord.http
import yarl
from aiohttp import web

from tests.discord.fake_discord_objects import (
    APP_FLAG_MESSAGE_CONTENT_LIMITED,
    MESSAGE_CONTENT,
    Call,
    Channel,
    Interaction,
    Message,
    _iso,
    _Snowflakes,
    snowflake_time,
)
from tests.discord.fake_discord_rest import DiscordRest
from tests.fake_platform import FakeServer

__all__ = ["Call", "Channel", "FakeDiscord", "Interaction", "Message"]


class FakeDiscord(DiscordRest, FakeServer):
    def __init__(self, *, token: str = "fake.bot-token.x", allow_message_content: bool = True) -> None:
        self.token, self.allow_message_content = token, allow_message_content
        self.ids = _Snowflakes()
        self.app_id = self.ids.new()
        self.bot_user = self._user(self.app_id, "minigpt4", bot=True)
        self.guild_id = self.ids.new()
        self.bot_role = self.ids.new()
        self.roles: dict[int, str] = {}  # the server's own roles (id -> name), besides @everyone and the bot's
        self.member_roles: dict[str, list[str]] = {}  # user id -> the ids of the roles that member has
        self.channels: dict[int, Channel] = {}
        self.general = self._channel(0, "general").id
        self.voice = self._channel(2, "voice-chat").id  # messages there, but no threads
        self.alice = self._user(self.ids.new(), "alice")
        self.bob = self._user(self.ids.new(), "bob")
        self.other_bot = self._user(self.ids.new(), "otherbot", bot=True)
        dm = Channel(self.ids.new(), 1, recipients=[self.alice])
        self.channels[dm.id] = dm
        self.dm = dm.id
        self.messages: dict[int, Message] = {}
        self.interactions: dict[str, Interaction] = {}
        self.commands: dict[str, dict[str, dict[str, Any]]] = {}  # scope ("global" | guild id) -> name -> command
        self.command_writes: list[tuple[str, list[str]]] = []  # (scope, names) of every bulk PUT
        self.creates_today: dict[str, int] = {}
        self.calls: list[Call] = []
        self.failures: dict[tuple[str, str], list[float]] = {}
        self.files: dict[int, dict[str, Any]] = {}
        self.downloads: list[dict[str, Any]] = []
        self.identifies: list[dict[str, Any]] = []
        self.heartbeats = 0
        self.compression = ""  # the transport compression the client asked for
        self.resumes = 0
        self.gateway_open = asyncio.Event()
        self.gateway_open.set()
        self.list_threads = True  # GUILD_CREATE lists the active threads (False: the client must look them up)
        self.thread_ids_from_messages = True  # Discord's rule: a thread started from a message has its id
        self.thread_sources: dict[int, int] = {}  # message id -> the thread started from it
        self.connections = 0
        self.threads_created: list[int] = []
        self._ws: web.WebSocketResponse | None = None
        self._zlib: Any = None
        self._seq = 0
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ objects

    def _user(self, user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
        user = {"id": str(user_id), "username": name, "discriminator": "0", "global_name": name.title(),
                "avatar": None, "flags": 0, "public_flags": 0}  # fmt: skip
        if bot:
            user["bot"] = True
        return user

    def _channel(self, kind: int, name: str) -> Channel:
        channel = Channel(self.ids.new(), kind, name, self.guild_id)
        self.channels[channel.id] = channel
        return channel

    def channel_json(self, channel: Channel) -> dict[str, Any]:
        if channel.type == 1:
            return {"id": str(channel.id), "type": 1, "recipients": channel.recipients, "last_message_id": None,
                    "flags": 0}  # fmt: skip
        data: dict[str, Any] = {
            "id": str(channel.id), "type": channel.type, "name": channel.name, "guild_id": str(channel.guild_id),
            "position": 0, "permission_overwrites": [], "nsfw": False, "parent_id": None, "topic": None,
            "last_message_id": None, "rate_limit_per_user": 0, "flags": 0,
        }  # fmt: skip
        if channel.type == 2:
            data |= {"bitrate": 64000, "user_limit": 0, "rtc_region": None}
        if channel.type == 11:
            data |= {
                "parent_id": str(channel.parent_id), "owner_id": str(channel.owner_id), "message_count": 0,
                "member_count": 1, "total_message_sent": 0,
                "thread_metadata": {"archived": False, "auto_archive_duration": 1440, "archive_timestamp": _iso(),
                                    "locked": False, "create_timestamp": _iso()},
            }  # fmt: skip
        return data

    def _member(self, user: dict[str, Any], roles: list[str] | None = None) -> dict[str, Any]:
        """A guild member object; ``roles`` (role id strings, never @everyone) default to ``member_roles``."""
        roles = list(self.member_roles.get(user["id"], []) if roles is None else roles)
        return {"user": user, "roles": roles, "joined_at": _iso(), "deaf": False, "mute": False, "flags": 0,
                "nick": None, "avatar": None, "pending": False, "premium_since": None}  # fmt: skip

    def _role_json(self, role_id: int, name: str, position: int, **extra: Any) -> dict[str, Any]:
        return {"id": str(role_id), "name": name, "permissions": "1071698660929", "position": position, "color": 0,
                "hoist": False, "managed": False, "mentionable": False, "flags": 0} | extra  # fmt: skip

    async def add_role(self, name: str, *, members: tuple[dict[str, Any], ...] = ()) -> int:
        """A new server role given to ``members``; announced with GUILD_ROLE_CREATE when the bot is connected."""
        role_id = self.ids.new()
        self.roles[role_id] = name
        for user in members:
            self.member_roles.setdefault(user["id"], []).append(str(role_id))
        if self.connected:
            role = self._role_json(role_id, name, len(self.roles) + 1)  # above the bot's role, as in guild_json
            await self.dispatch("GUILD_ROLE_CREATE", {"guild_id": str(self.guild_id), "role": role})
        return role_id

    def guild_json(self) -> dict[str, Any]:
        everyone = self._role_json(self.guild_id, "@everyone", 0)
        bot_role = self._role_json(self.bot_role, "minigpt4", 1, managed=True, tags={"bot_id": str(self.app_id)})
        own = [self._role_json(role_id, name, i + 2) for i, (role_id, name) in enumerate(self.roles.items())]
        channels = [self.channel_json(c) for c in self.channels.values() if c.guild_id and c.type != 11]
        threads = [self.channel_json(c) for c in self.channels.values() if c.type == 11 and self.list_threads]
        return {
            "id": str(self.guild_id), "name": "Fake Server", "icon": None, "owner_id": self.alice["id"],
            "roles": [everyone, bot_role, *own], "channels": channels, "threads": threads,
            "members": [self._member(self.bot_user, [str(self.bot_role)])], "member_count": 4, "emojis": [],
            "stickers": [], "features": [], "joined_at": _iso(), "large": False, "unavailable": False,
            "voice_states": [], "presences": [], "stage_instances": [], "guild_scheduled_events": [],
            "soundboard_sounds": [], "verification_level": 0, "default_message_notifications": 0,
            "explicit_content_filter": 0, "mfa_level": 0, "premium_tier": 0, "preferred_locale": "en-US",
            "system_channel_id": None, "afk_channel_id": None, "afk_timeout": 300, "nsfw_level": 0,
        }  # fmt: skip

    def message_json(self, m: Message) -> dict[str, Any]:
        edited = _iso(time.time() - (time.monotonic() - m.edits[-1][0])) if len(m.edits) > 1 else None
        data: dict[str, Any] = {
            "id": str(m.id), "channel_id": str(m.channel_id), "author": m.author, "content": m.content,
            "timestamp": _iso(snowflake_time(m.id)), "edited_timestamp": edited, "tts": False,
            "mention_everyone": False, "mentions": m.mentions,
            "mention_roles": m.mention_roles, "attachments": m.attachments, "embeds": [], "pinned": False,
            "type": m.type, "flags": m.flags, "components": [],
        }  # fmt: skip
        if m.guild_id is not None:
            data["guild_id"] = str(m.guild_id)
            if not m.bot:
                data["member"] = {k: v for k, v in self._member(m.author).items() if k != "user"}
        if m.reference:
            data["message_reference"] = m.reference
        if m.webhook_id:
            data["webhook_id"] = str(m.webhook_id)
            data["application_id"] = str(self.app_id)
        return data

    # ------------------------------------------------------------------ server

    async def start(self) -> FakeDiscord:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/cdn/attachments/{cid}/{aid}/{name}", self._cdn)
        await self._listen(app)
        return self

    @contextlib.asynccontextmanager
    async def routed(self) -> AsyncIterator[FakeDiscord]:
        """Point discord.py at this fake (its two class attributes), restoring them afterwards."""
        route, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        discord.http.Route.BASE = self.base + "/api/v10"
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(f"ws://127.0.0.1:{self.port}/gateway")
        try:
            yield self
        finally:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = route, gateway

    def _activity(self) -> int:
        return len(self.calls)

    def _progress(self) -> str:
        return f"timed out; calls so far: {[(c.method, c.route, c.status) for c in self.calls]}"

    async def first_thread(self, timeout: float = 20.0) -> int:
        """The id of the first thread the bot created, once there is one."""
        return await self.wait_for(lambda: self.threads_created and self.threads_created[0], timeout)

    async def picture_question(self, picture: bytes, text: str = "What is this?") -> tuple[dict[str, Any], int]:
        """A user mentions the bot in #general with ``picture`` attached: the message sent, and the thread the
        bot opened for it (the start of most conversation tests)."""
        mention = self.user_message(self.general, text, mention=True, attachments=[self.add_attachment(picture)])
        await self.send(mention)
        return mention, await self.first_thread()

    async def slash_question(
        self, picture: bytes, text: str | None = "What is this?", **kwargs: Any
    ) -> tuple[Interaction, int]:
        """A user's ``/ask`` with ``picture`` (``kwargs``: :meth:`ask`'s): the interaction, and the thread the bot
        opened for it (the start of most slash-command tests)."""
        interaction = await self.interact(self.ask(self.add_attachment(picture), text, **kwargs))
        return interaction, await self.first_thread()

    # ------------------------------------------------------------------ gateway

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        await self.gateway_open.wait()  # cleared: a connection attempt hangs, as during an outage
        ws = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await ws.prepare(request)
        self.connections += 1
        self._ws = ws
        self.compression = request.query.get("compress", "")
        self._zlib = zlib.compressobj() if self.compression == "zlib-stream" else None
        await self._send({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None})
        async for frame in ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            payload = json.loads(frame.data)
            op = payload.get("op")
            if op == 1:
                self.heartbeats += 1
                await self._send({"op": 11, "d": None, "s": None, "t": None})
            elif op == 2:
                self._seq = 0
                await self._identify(ws, payload["d"])
            elif op == 6:
                if payload["d"].get("token") != self.token:
                    await ws.close(code=4004, message=b"Authentication failed.")
                else:
                    self.resumes += 1
                    await self.dispatch("RESUMED", {})
        if self._ws is ws:
            self._ws = None
        self._notify()
        return ws

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        self.identifies.append(data)
        self._notify()
        if data.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        if int(data.get("intents", 0)) & MESSAGE_CONTENT and not self.allow_message_content:
            await ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        await self.dispatch("READY", {
            "v": 10, "user": self.bot_user, "guilds": [{"id": str(self.guild_id), "unavailable": True}],
            "session_id": uuid.uuid4().hex, "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway",
            "application": {"id": str(self.app_id), "flags": APP_FLAG_MESSAGE_CONTENT_LIMITED}, "private_channels": [],
            "relationships": [], "presences": [], "guild_join_requests": [], "geo_ordered_rtc_regions": [],
        })  # fmt: skip
        await self.dispatch("GUILD_CREATE", self.guild_json())

    async def _send(self, payload: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            return
        text = json.dumps(payload)
        if self._zlib is not None:
            await ws.send_bytes(self._zlib.compress(text.encode()) + self._zlib.flush(zlib.Z_SYNC_FLUSH))
        else:
            await ws.send_str(text)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        self._seq += 1
        await self._send({"op": 0, "t": event, "s": self._seq, "d": data})

    def _dispatch_soon(self, event: str, data: dict[str, Any]) -> None:
        asyncio.get_running_loop().create_task(self.dispatch(event, data))

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    async def drop_connection(self) -> None:
        """Close the gateway websocket as a network failure would (discord.py reconnects)."""
        if self._ws is not None:
            await self._ws.close(code=4000, message=b"fake drop")

    # ------------------------------------------------------------------ users' actions

    def user_message(
        self, channel: int, content: str, *, author: dict[str, Any] | None = None,
        attachments: list[dict[str, Any]] | None = None, mention: bool = False, role_mention: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """Record a user's message; returns the MESSAGE_CREATE payload (send it with :meth:`send`)."""
        author = author or self.alice
        kind = self.channels[channel]
        if mention:
            content = f"<@{self.app_id}> {content}"
        if role_mention:
            content = f"<@&{self.bot_role}> {content}"
        message = Message(
            self.ids.new(), channel, author, content, guild_id=None if kind.type == 1 else self.guild_id,
            attachments=attachments or [], mentions=[self.bot_user] if mention else [],
            mention_roles=[str(self.bot_role)] if role_mention else [],
        )  # fmt: skip
        message.edits.append((time.monotonic(), content))
        self.messages[message.id] = message
        payload = self.message_json(message)
        if kind.type != 1 and not self.allow_message_content and not mention:
            payload |= {"content": "", "attachments": [], "embeds": []}
        return payload

    async def send(self, payload: dict[str, Any]) -> None:
        await self.dispatch("MESSAGE_CREATE", payload)

    def slash(
        self, name: str, *, channel: int | None = None, user: dict[str, Any] | None = None,
        options: list[dict[str, Any]] | None = None, attachments: list[dict[str, Any]] | None = None,
        age_s: float = 0.0,
    ) -> dict[str, Any]:  # fmt: skip
        """INTERACTION_CREATE for ``/name`` (a registered command); ``age_s`` ages its snowflake (and token)."""
        command = self.command(name)
        channel_id = self.general if channel is None else channel
        user = user or self.alice
        token = "aW50ZXJhY3Rpb24" + uuid.uuid4().hex
        guild = None if self.channels[channel_id].type == 1 else self.guild_id
        interaction = Interaction(self.ids.new(time.time() - age_s), token, channel_id, guild, int(user["id"]), name)
        self.interactions[token] = interaction
        data: dict[str, Any] = {"id": command["id"], "name": name, "type": 1, "options": options or []}
        if "guild_id" in command:
            data["guild_id"] = command["guild_id"]
        if attachments:
            data["resolved"] = {"attachments": {a["id"]: a for a in attachments}}
        payload: dict[str, Any] = {
            "id": str(interaction.id), "application_id": str(self.app_id), "type": 2, "token": token, "version": 1,
            "data": data, "channel_id": str(channel_id), "channel": self.channel_json(self.channels[channel_id]),
            "app_permissions": "309237746688", "locale": "en-US", "entitlements": [],
            "attachment_size_limit": 10 * 1024 * 1024,
        }  # fmt: skip
        if interaction.guild_id is None:
            payload |= {"user": user, "context": 1, "authorizing_integration_owners": {"0": "0"}}
        else:
            payload |= {"guild_id": str(self.guild_id), "guild_locale": "en-US", "context": 0,
                        "member": self._member(user) | {"permissions": "1071698660929"},
                        "authorizing_integration_owners": {"0": str(self.guild_id)}}  # fmt: skip
        return payload

    def ask(
        self, attachment: dict[str, Any], question: str | None = None, preset: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        options = [{"name": "image", "type": 11, "value": attachment["id"]}]
        if question is not None:
            options.append({"name": "question", "type": 3, "value": question})
        if preset is not None:
            options.append({"name": "preset", "type": 3, "value": preset})
        return self.slash("ask", options=options, attachments=[attachment], **kwargs)

    async def interact(self, payload: dict[str, Any]) -> Interaction:
        interaction = self.interactions[payload["token"]]
        interaction.sent_at = asyncio.get_running_loop().time()
        await self.dispatch("INTERACTION_CREATE", payload)
        return interaction

    # ------------------------------------------------------------------ reading the state

    def in_channel(self, channel: int, *, bots: bool = True, ephemeral: bool = False) -> list[Message]:
        return [m for m in self.messages.values() if m.channel_id == channel and not m.deleted
                and (bots or not m.bot) and (ephemeral or not m.ephemeral)]  # fmt: skip

    def bot_messages(self, channel: int, *, ephemeral: bool = False) -> list[Message]:
        return [m for m in self.in_channel(channel, ephemeral=ephemeral) if m.bot]

    def fast_edits(self, interval_s: float) -> list[tuple[int, float]]:
        """Bot messages with two versions (creation included) closer than ``interval_s``: (message id, gap)."""
        found = []
        for message in self.messages.values():
            times = [at for at, _ in message.edits]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            if message.bot and gaps and min(gaps) < interval_s:
                found.append((message.id, min(gaps)))
        return found

    def ephemerals(self) -> list[Message]:
        return [m for m in self.messages.values() if m.ephemeral and not m.deleted and m.content]
