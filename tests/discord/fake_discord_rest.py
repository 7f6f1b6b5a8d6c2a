"""The REST half of the fake Discord (``fake_discord.py`` documents the routes): the routes discord.py calls
for the bot, application commands, interaction callbacks and webhooks, channel messages and threads, and the
CDN.  A mixin of :class:`fake_discord.FakeDiscord`, which holds the state it reads and writes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

from aiohttp import web

from tests.discord.fake_discord_objects import (
    _COMPILED,
    APP_FLAG_MESSAGE_CONTENT_LIMITED,
    DEFER_LIMIT_S,
    EPHEMERAL,
    LOADING,
    MESSAGE_LIMIT,
    UPLOAD_LIMIT,
    Call,
    Channel,
    Interaction,
    Message,
    _Refuse,
)


class DiscordRest:
    """REST, interaction webhooks and CDN routes over the state :class:`fake_discord.FakeDiscord` keeps."""

    # The state and helpers FakeDiscord provides (declared for readers; set in FakeDiscord.__init__).
    token: str
    allow_message_content: bool
    calls: list[Call]
    messages: dict[int, Message]
    channels: dict[int, Channel]
    interactions: dict[str, Interaction]

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
