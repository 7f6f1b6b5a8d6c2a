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
import datetime
import hashlib
import itertools
import json
import re
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import discord
import discord.gateway
import discord.http
import yarl
from aiohttp import web

from tests.fake_platform import FakeServer

DISCORD_EPOCH_MS = 1420070400000
MESSAGE_LIMIT = 2000
TOKEN_LIFETIME_MS = 15 * 60 * 1000
DEFER_LIMIT_S = 3.0
MESSAGE_CONTENT = 1 << 15
APP_FLAG_MESSAGE_CONTENT_LIMITED = 1 << 19
EPHEMERAL, LOADING = 64, 128
UPLOAD_LIMIT = 10 * 1024 * 1024

ROUTES = [
    ("GET", "/users/@me", "users/@me"),
    ("GET", "/oauth2/applications/@me", "oauth2/applications/@me"),
    ("GET", "/applications/{app}/commands", "commands"),
    ("PUT", "/applications/{app}/commands", "commands"),
    ("GET", "/applications/{app}/guilds/{guild}/commands", "guild-commands"),
    ("PUT", "/applications/{app}/guilds/{guild}/commands", "guild-commands"),
    ("POST", "/interactions/{iid}/{itoken}/callback", "callback"),
    ("GET", "/webhooks/{app}/{itoken}/messages/@original", "original"),
    ("PATCH", "/webhooks/{app}/{itoken}/messages/@original", "original"),
    ("DELETE", "/webhooks/{app}/{itoken}/messages/@original", "original"),
    ("POST", "/webhooks/{app}/{itoken}", "followup"),
    ("PATCH", "/webhooks/{app}/{itoken}/messages/{mid}", "followup-message"),
    ("DELETE", "/webhooks/{app}/{itoken}/messages/{mid}", "followup-message"),
    ("POST", "/channels/{cid}/messages", "messages"),
    ("PATCH", "/channels/{cid}/messages/{mid}", "message"),
    ("DELETE", "/channels/{cid}/messages/{mid}", "message"),
    ("POST", "/channels/{cid}/messages/{mid}/threads", "threads"),
    ("POST", "/channels/{cid}/typing", "typing"),
    ("GET", "/channels/{cid}", "channel"),
]
_COMPILED = [
    (method, re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$"), name, path)
    for method, path, name in ROUTES
]


class _Snowflakes:
    def __init__(self) -> None:
        self._inc = itertools.count(1)

    def new(self, at: float | None = None) -> int:
        ms = int((time.time() if at is None else at) * 1000)
        return ((ms - DISCORD_EPOCH_MS) << 22) | (1 << 17) | (next(self._inc) & 0xFFF)


def snowflake_time(snowflake: int) -> float:
    return ((snowflake >> 22) + DISCORD_EPOCH_MS) / 1000


def _iso(at: float | None = None) -> str:
    return datetime.datetime.fromtimestamp(time.time() if at is None else at, datetime.UTC).isoformat()


@dataclass
class Call:
    method: str
    route: str  # the route's name, e.g. "original", "messages"
    path: str
    body: Any
    at: float
    status: int = 200
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class Message:
    id: int
    channel_id: int
    author: dict[str, Any]
    content: str
    guild_id: int | None = None
    attachments: list[dict[str, Any]] = field(default_factory=list)
    mentions: list[dict[str, Any]] = field(default_factory=list)
    mention_roles: list[str] = field(default_factory=list)
    type: int = 0
    flags: int = 0
    reference: dict[str, Any] | None = None
    webhook_id: int | None = None
    interaction_id: int | None = None
    allowed_mentions: dict[str, Any] | None = None
    edits: list[tuple[float, str]] = field(default_factory=list)  # (time, content) of every version
    deleted: bool = False
    uploads: list[dict[str, Any]] = field(default_factory=list)  # files sent with it: filename, content_type, data

    @property
    def bot(self) -> bool:
        return bool(self.author.get("bot"))

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)


@dataclass
class Channel:
    id: int
    type: int  # 0 text, 1 DM, 2 voice, 11 public thread
    name: str = ""
    guild_id: int | None = None
    parent_id: int | None = None
    owner_id: int | None = None
    recipients: list[dict[str, Any]] = field(default_factory=list)
    threads_allowed: bool = True
    uploads_allowed: bool = True  # False: the bot lacks Attach Files here


@dataclass
class Interaction:
    id: int
    token: str
    channel_id: int
    guild_id: int | None
    user_id: int
    name: str
    sent_at: float = 0.0  # loop time it was dispatched
    state: str = "new"  # new | deferred | responded
    original_id: int | None = None
    callbacks: list[tuple[float, int]] = field(default_factory=list)  # (seconds after dispatch, type)

    @property
    def expires_at(self) -> float:
        return snowflake_time(self.id) + TOKEN_LIFETIME_MS / 1000


class FakeDiscord(FakeServer):
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

    # ------------------------------------------------------------------ REST

    def fail_next(self, method: str, route: str, count: int = 1, retry_after: float = 0.5) -> None:
        """The next ``count`` calls of ``method route`` (e.g. ``"PATCH", "original"``) get a 429."""
        self.failures.setdefault((method, route), []).extend([retry_after] * count)

    def calls_of(self, method: str, route: str, status: int | None = 200) -> list[Call]:
        return [c for c in self.calls if c.method == method and c.route == route
                and (status is None or c.status == status)]  # fmt: skip

    def _json(self, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        if status == 204:
            return web.Response(status=204)
        return web.Response(body=json.dumps(body).encode(), status=status,
                            headers={"Content-Type": "application/json", **(headers or {})})  # fmt: skip

    def _error(self, status: int, code: int, message: str) -> web.Response:
        return self._json({"message": message, "code": code}, status)

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        for method, pattern, route, _template in _COMPILED:
            match = pattern.match(path)
            if method == request.method and match:
                name = route
                break
        else:
            return self._error(404, 0, f"404: Not Found ({request.method} {path})")
        body: Any = None
        if request.can_read_body:
            if request.content_type == "application/json":
                body = await request.json()
            elif request.content_type.startswith("multipart/"):  # files: payload_json + files[n]
                form = await request.post()
                body = json.loads(form.get("payload_json", "{}"))  # type: ignore[arg-type]
                body["__files__"] = [
                    {"filename": v.filename, "content_type": v.content_type, "data": v.file.read()}
                    for v in form.values() if isinstance(v, web.FileField)
                ]  # fmt: skip
        call = Call(request.method, name, path, body, time.monotonic(), params=dict(request.query))
        self.calls.append(call)
        try:
            response = await self._route(request, name, match.groupdict(), body)
        except _Refuse as exc:
            response = exc.response
        call.status = response.status
        self._notify()
        return response

    async def _route(self, request: web.Request, name: str, args: dict[str, str], body: Any) -> web.Response:
        method = request.method
        waits = self.failures.get((method, name))
        if waits:
            retry_after = waits.pop(0)
            return self._json(
                {"message": "You are being rate limited.", "retry_after": retry_after, "global": False}, 429,
                {"Via": "1.1 google", "Retry-After": str(max(1, round(retry_after))), "X-RateLimit-Scope": "user",
                 "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
                 "X-RateLimit-Reset-After": str(retry_after), "X-RateLimit-Bucket": f"fake-{name}"},
            )  # fmt: skip
        if name in ("callback", "original", "followup", "followup-message"):
            return self._interaction_route(method, name, args, body, request)
        if request.headers.get("Authorization") != f"Bot {self.token}":
            return self._error(401, 0, "401: Unauthorized")
        if name == "users/@me":
            return self._json(self.bot_user | {"verified": True, "mfa_enabled": False, "email": None})
        if name == "oauth2/applications/@me":
            flags = APP_FLAG_MESSAGE_CONTENT_LIMITED if self.allow_message_content else 0
            return self._json({
                "id": str(self.app_id), "name": "minigpt4", "icon": None, "description": "", "summary": "",
                "bot_public": True, "bot_require_code_grant": False, "owner": self.alice, "verify_key": "00",
                "team": None, "flags": flags, "rpc_origins": [], "bot": self.bot_user,
            })  # fmt: skip
        if name in ("commands", "guild-commands"):
            if args["app"] != str(self.app_id):
                return self._error(403, 50001, "Missing Access")
            scope = args.get("guild", "global")
            if method == "GET":
                return self._json(list(self.commands.get(scope, {}).values()))
            return self._put_commands(scope, body)
        return self._channel_route(method, name, args, body)

    # ---------------------------------------------------------------- commands

    def _put_commands(self, scope: str, payload: list[dict[str, Any]]) -> web.Response:
        old = self.commands.get(scope, {})
        new_names = [c["name"] for c in payload if c["name"] not in old]
        if self.creates_today.get(scope, 0) + len(new_names) > 200:
            return self._error(429, 30034, "Max number of daily application command creates has been reached (200)")
        self.creates_today[scope] = self.creates_today.get(scope, 0) + len(new_names)
        stored = {}
        for command in payload:
            previous = old.get(command["name"])
            options = [self._stored_option(o) for o in command.get("options", [])]
            stored[command["name"]] = {
                "id": previous["id"] if previous else str(self.ids.new()), "application_id": str(self.app_id),
                "version": str(self.ids.new()), "type": command.get("type", 1), "name": command["name"],
                "description": command.get("description", ""), "options": options,
                "default_member_permissions": command.get("default_member_permissions"),
                "dm_permission": command.get("dm_permission", True), "nsfw": command.get("nsfw", False),
                "contexts": command.get("contexts") or [0, 1, 2], "integration_types": [0],
                "name_localizations": None, "description_localizations": None,
            }  # fmt: skip
            if scope != "global":
                stored[command["name"]]["guild_id"] = scope
        self.commands[scope] = stored
        self.command_writes.append((scope, list(stored)))
        return self._json(list(stored.values()))

    def _stored_option(self, option: dict[str, Any]) -> dict[str, Any]:
        stored = {k: v for k, v in option.items() if v is not None}
        if not stored.get("required"):
            stored.pop("required", None)  # Discord leaves out a false "required"
        if "options" in stored:
            stored["options"] = [self._stored_option(o) for o in stored["options"]]
        return stored

    def command(self, name: str) -> dict[str, Any]:
        """The registered command (guild first, then global) a user's slash command invokes."""
        for scope in (str(self.guild_id), "global"):
            if name in self.commands.get(scope, {}):
                return self.commands[scope][name]
        raise AssertionError(f"/{name} is not registered: {self.commands}")

    # ---------------------------------------------------------------- interactions

    def _interaction_route(
        self, method: str, name: str, args: dict[str, str], body: Any, request: web.Request
    ) -> web.Response:
        token = args["itoken"]
        interaction = self.interactions.get(token)
        if name == "callback":
            if interaction is None or str(interaction.id) != args["iid"]:
                return self._error(404, 10062, "Unknown interaction")
            return self._callback(interaction, body)
        if interaction is None or args["app"] != str(self.app_id):
            return self._error(404, 10015, "Unknown Webhook")
        if time.time() >= interaction.expires_at:
            return self._error(401, 50027, "Invalid Webhook Token")
        if interaction.state == "new":
            return self._error(404, 10015, "Unknown Webhook")
        if name == "original":
            original = self.messages.get(interaction.original_id or 0)
            if original is None or original.deleted:
                return self._error(404, 10008, "Unknown Message")
            if method == "GET":
                return self._json(self.message_json(original))
            if method == "DELETE":
                original.deleted = True
                return self._json(None, 204)
            self._edit(original, body)
            return self._json(self.message_json(original))
        if name == "followup":
            if request.query.get("wait") not in ("true", "1", "True"):
                return self._error(400, 0, "the fake wants wait=true")
            original = self.messages.get(interaction.original_id or 0)
            if original is not None and not original.deleted and original.flags & LOADING:
                self._edit(original, body)  # Discord: the first follow-up after a defer completes the response
                return self._json(self.message_json(original))
            self._check_content(body)
            flags = int(body.get("flags") or 0) & EPHEMERAL
            message = self._new_message(interaction.channel_id, body, webhook=True, flags=flags,
                                        interaction=interaction.id)  # fmt: skip
            return self._json(self.message_json(message))
        message = self.messages.get(int(args["mid"]))
        if message is None or message.deleted or message.interaction_id != interaction.id:
            return self._error(404, 10008, "Unknown Message")
        if method == "DELETE":
            message.deleted = True
            return self._json(None, 204)
        self._edit(message, body)
        return self._json(self.message_json(message))

    def _callback(self, interaction: Interaction, body: dict[str, Any]) -> web.Response:
        elapsed = asyncio.get_running_loop().time() - interaction.sent_at
        interaction.callbacks.append((elapsed, int(body["type"])))
        if elapsed > DEFER_LIMIT_S:
            return self._error(404, 10062, "Unknown interaction")
        if interaction.state != "new":
            return self._error(400, 40060, "Interaction has already been acknowledged.")
        kind = int(body["type"])
        data = body.get("data") or {}
        ephemeral = bool(int(data.get("flags") or 0) & EPHEMERAL)
        if kind == 5:
            interaction.state = "deferred"
            payload = {"content": ""}
            flags = LOADING | (EPHEMERAL if ephemeral else 0)
        elif kind == 4:
            self._check_content(data)
            interaction.state = "responded"
            payload = data
            flags = EPHEMERAL if ephemeral else 0
        else:
            return self._error(400, 50035, f"the fake does not answer callback type {kind}")
        message = self._new_message(interaction.channel_id, payload, webhook=True, flags=flags,
                                    interaction=interaction.id, check=False)  # fmt: skip
        interaction.original_id = message.id
        return self._json({
            "interaction": {"id": str(interaction.id), "type": 2, "response_message_id": str(message.id),
                            "response_message_loading": kind == 5, "response_message_ephemeral": ephemeral},
            "resource": {"type": kind, "message": self.message_json(message)},
        })  # fmt: skip

    # ---------------------------------------------------------------- channels

    def _check_content(self, body: dict[str, Any]) -> None:
        content = body.get("content")
        if content is not None and len(content) > MESSAGE_LIMIT:
            raise _Refuse(
                self._json(
                    {
                        "code": 50035,
                        "message": "Invalid Form Body",
                        "errors": {
                            "content": {
                                "_errors": [
                                    {"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}
                                ]
                            }
                        },
                    },
                    400,
                )
            )
        if not content and not body.get("embeds") and not body.get("__files__"):
            raise _Refuse(self._error(400, 50006, "Cannot send an empty message"))

    def _new_message(
        self, channel_id: int, body: dict[str, Any], *, webhook: bool = False, flags: int = 0,
        interaction: int | None = None, check: bool = True,
    ) -> Message:  # fmt: skip
        if check:
            self._check_content(body)
        channel = self.channels[channel_id]
        guild = self.guild_id if channel.type != 1 else None
        message = Message(
            self.ids.new(), channel_id, self.bot_user, body.get("content") or "", guild_id=guild, flags=flags,
            webhook_id=self.app_id if webhook else None, interaction_id=interaction,
            allowed_mentions=body.get("allowed_mentions"), reference=body.get("message_reference"),
            type=19 if body.get("message_reference") else (20 if interaction else 0),
        )  # fmt: skip
        if not flags & LOADING:  # a deferred response has no text yet: its first edit is its first version
            message.edits.append((time.monotonic(), message.content))
        for upload in body.get("__files__") or []:
            if len(upload["data"]) > UPLOAD_LIMIT:
                raise _Refuse(self._error(413, 40005, "Request entity too large"))
            if not channel.uploads_allowed and not webhook:  # interaction follow-ups need no channel permission
                raise _Refuse(self._error(403, 50013, "Missing Permissions"))
            message.uploads.append(upload)
            url = f"{self.base}/cdn/none"
            message.attachments.append({"id": str(self.ids.new()), "filename": upload["filename"], "url": url,
                                        "size": len(upload["data"]), "content_type": upload["content_type"],
                                        "proxy_url": url})  # fmt: skip
        self.messages[message.id] = message
        if not message.ephemeral:
            self._dispatch_soon("MESSAGE_CREATE", self.message_json(message))
        return message

    def _edit(self, message: Message, body: dict[str, Any]) -> None:
        if "content" in body:
            self._check_content(body | {"content": body["content"]})
            message.content = body["content"] or ""
        message.flags &= ~LOADING
        if "allowed_mentions" in body:
            message.allowed_mentions = body["allowed_mentions"]
        message.edits.append((time.monotonic(), message.content))

    def _channel_route(self, method: str, name: str, args: dict[str, str], body: Any) -> web.Response:
        channel = self.channels.get(int(args["cid"]))
        if channel is None:
            return self._error(404, 10003, "Unknown Channel")
        if name == "channel":
            return self._json(self.channel_json(channel))
        if name == "typing":
            return self._json(None, 204)
        if name == "messages":
            if body.get("message_reference"):
                ref = self.messages.get(int(body["message_reference"]["message_id"]))
                if ref is None and body["message_reference"].get("fail_if_not_exists", True):
                    return self._error(400, 50035, "Invalid Form Body (unknown message_reference)")
            message = self._new_message(channel.id, body)
            return self._json(self.message_json(message))
        message = self.messages.get(int(args["mid"]))
        if message is None or message.deleted or message.channel_id != channel.id:
            return self._error(404, 10008, "Unknown Message")
        if name == "threads":
            return self._start_thread(channel, message, body)
        if message.author["id"] != self.bot_user["id"] or message.webhook_id:
            if method == "PATCH" or message.webhook_id:
                return self._error(403, 50005, "Cannot edit a message authored by another user")
            return self._error(403, 50013, "Missing Permissions")  # deleting others' messages
        if method == "DELETE":
            message.deleted = True
            return self._json(None, 204)
        self._edit(message, body)
        return self._json(self.message_json(message))

    def _start_thread(self, channel: Channel, message: Message, body: dict[str, Any]) -> web.Response:
        if channel.type not in (0, 5) or not channel.threads_allowed:
            if channel.type not in (0, 5):
                return self._error(400, 50024, "Cannot execute action on this channel type")
            return self._error(403, 50013, "Missing Permissions")
        if message.id in self.thread_sources:
            return self._error(400, 160004, "A thread has already been created for this message")
        if message.ephemeral:
            return self._error(400, 50035, "Invalid Form Body (ephemeral message)")
        name = (body or {}).get("name") or ""
        if not 1 <= len(name) <= 100:
            return self._error(400, 50035, "Invalid Form Body (name)")
        thread_id = message.id if self.thread_ids_from_messages else self.ids.new()
        thread = Channel(thread_id, 11, name, self.guild_id, parent_id=channel.id, owner_id=self.app_id,
                         uploads_allowed=channel.uploads_allowed)  # fmt: skip # permissions come from the parent
        self.channels[thread.id] = thread
        self.thread_sources[message.id] = thread.id
        self.threads_created.append(thread.id)
        data = self.channel_json(thread)
        self._dispatch_soon("THREAD_CREATE", data | {"newly_created": True})
        return self._json(data, 201)

    # ------------------------------------------------------------------ CDN

    def add_attachment(
        self, data: bytes, filename: str = "photo.png", content_type: str | None = "image/png", *,
        size: int | None = None, width: int | None = 64, height: int | None = 48, expires_in: float = 3600.0,
    ) -> dict[str, Any]:  # fmt: skip
        """Store bytes on the CDN; returns the attachment object Discord would deliver."""
        attachment_id = self.ids.new()
        expires = int(time.time() + expires_in)
        signature = hashlib.sha256(f"{attachment_id}:{expires}".encode()).hexdigest()[:16]
        query = f"ex={expires:x}&is={int(time.time()):x}&hm={signature}"
        url = f"{self.base}/cdn/attachments/{self.general}/{attachment_id}/{filename}?{query}"
        self.files[attachment_id] = {"data": data, "content_type": content_type or "application/octet-stream"}
        found: dict[str, Any] = {"id": str(attachment_id), "filename": filename, "url": url, "proxy_url": url,
                                 "size": len(data) if size is None else size, "flags": 0}  # fmt: skip
        if content_type:
            found["content_type"] = content_type
        if width and height and (content_type or "").startswith("image/"):
            found |= {"width": width, "height": height}
        return found

    async def _cdn(self, request: web.Request) -> web.Response:
        attachment_id = int(request.match_info["aid"])
        expires = int(request.query.get("ex", "0"), 16)
        signature = hashlib.sha256(f"{attachment_id}:{expires}".encode()).hexdigest()[:16]
        stored = self.files.get(attachment_id)
        ok = stored is not None and request.query.get("hm") == signature and time.time() < expires
        self.downloads.append({"id": attachment_id, "ok": ok, "authorization": request.headers.get("Authorization"),
                               "at": time.monotonic()})  # fmt: skip
        self._notify()
        if not ok:
            return web.Response(status=404, text="This content is no longer available.")
        return web.Response(body=stored["data"], headers={"Content-Type": stored["content_type"]})

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


class _Refuse(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response
