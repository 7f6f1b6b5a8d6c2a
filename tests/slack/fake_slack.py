"""A stateful fake Slack on loopback, driven only through the real slack_bolt / slack_sdk clients.

One aiohttp server on ``127.0.0.1:<free port>`` serves:

``POST /api/<method>``   the Web API methods the adapter uses (``auth.test``, ``apps.connections.open``,
                         ``chat.postMessage``, ``chat.update``, ``chat.postEphemeral``, ``chat.delete``,
                         ``conversations.replies``) with real message state: messages per channel with
                         ``ts``, ``thread_ts``, text and every edit; bot token required (else
                         ``invalid_auth``); ``fail_next(method, n)`` answers the next *n* calls with 429 +
                         ``Retry-After``; text over 4,000 characters is ``msg_too_long``.
``GET /link``            the Socket Mode websocket: ``hello`` on connect, then the envelopes a test
                         sends (``events_api``, ``slash_commands``); acks are recorded by ``envelope_id``.
                         With ``echo=True`` the bot's own posts and edits come back as ``message`` /
                         ``message_changed`` events, as on real Slack.
``GET /files/<id>/<name>``  ``url_private``: the bytes with ``Authorization: Bearer <bot token>``, else a
                         200 ``text/html`` login page (as Slack answers without ``files:read``).
``POST /respond/<id>``   slash-command ``response_url``s.

Every call is recorded in ``calls`` (method, arguments, loop time, status).  ``http_event`` posts a
body signed with the real ``SignatureVerifier`` to an HTTP-mode app.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fake_platform import FakeServer
from tests.slack.fake_slack_deliveries import SlackDeliveries

LOGIN_PAGE = "<!DOCTYPE html><html><head><title>Slack</title></head><body>Sign in to Slack</body></html>"
BOT_METHODS = {
    "auth.test",
    "chat.postMessage",
    "chat.update",
    "chat.postEphemeral",
    "chat.delete",
    "conversations.replies",
    "files.getUploadURLExternal",
    "files.completeUploadExternal",
}


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    at: float
    status: int = 200


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    user: str
    thread_ts: str | None = None
    bot_id: str | None = None
    edits: list[tuple[float, str]] = field(default_factory=list)  # (time, text) of every version, first = posted
    deleted: bool = False


class FakeSlack(SlackDeliveries, FakeServer):
    def __init__(
        self,
        *,
        bot_token: str = "xoxb-fake-bot",
        app_token: str = "xapp-fake-app",
        signing_secret: str = "fake-signing-secret",
        team: str = "T0FAKE",
        bot_user: str = "UBOT",
        bot_id: str = "BBOT",
        echo: bool = True,
        clock: Any = time.monotonic,
    ) -> None:
        self.bot_token, self.app_token, self.signing_secret = bot_token, app_token, signing_secret
        self.team, self.bot_user, self.bot_id, self.echo, self.clock = team, bot_user, bot_id, echo, clock
        self.calls: list[Call] = []
        self.messages: dict[str, list[Message]] = {}
        self.ephemerals: list[dict[str, Any]] = []
        self.responses: list[dict[str, Any]] = []  # posts to response_url
        self.downloads: list[dict[str, Any]] = []  # file GETs: id, authorized
        self.file_gate: asyncio.Event | None = None  # when set to an Event: file GETs answer once it is set
        self.acks: dict[str, tuple[float, Any]] = {}  # envelope_id -> (time, payload)
        self.sent: dict[str, float] = {}  # envelope_id -> time sent
        self.files: dict[str, dict[str, Any]] = {}
        self.scopes: set[str] = {"files:write"}  # granted bot scopes the fake checks (files:write for uploads)
        self.uploads: dict[str, dict[str, Any]] = {}  # file_id -> filename, length, data, shared (channel, thread)
        self.failures: dict[str, list[int]] = {}  # method -> Retry-After of each upcoming 429
        self.connections = 0
        self._ts = itertools.count(1)
        self._ws: web.WebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ server

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/link", self._link)
        app.router.add_get("/files/{id}/{name}", self._file)
        app.router.add_post("/respond/{id}", self._respond)
        app.router.add_post("/upload/{id}", self._upload)
        await self._listen(app)
        return self

    @property
    def api_url(self) -> str:
        return self.base + "/api/"

    def _activity(self) -> int:
        return len(self.calls) + len(self.acks) + len(self.responses)

    def _progress(self) -> str:
        return f"timed out waiting; calls so far: {[c.method for c in self.calls]}"

    # ------------------------------------------------------------------ Web API

    def new_ts(self) -> str:
        n = next(self._ts)
        return f"{1700000000 + n}.{n:06d}"

    def fail_next(self, method: str, count: int = 1, retry_after: int = 1) -> None:
        self.failures.setdefault(method, []).extend([retry_after] * count)

    def calls_of(self, method: str, status: int | None = 200) -> list[Call]:
        return [c for c in self.calls if c.method == method and (status is None or c.status == status)]

    async def _args(self, request: web.Request) -> dict[str, Any]:
        args: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            args.update(await request.json())
        elif request.can_read_body:
            args.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        return args

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args = await self._args(request)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ") or args.get("token", "")
        call = Call(method, args, self.clock())
        self.calls.append(call)
        self._notify()
        if self.failures.get(method):
            call.status = 429
            retry_after = self.failures[method].pop(0)
            return web.json_response(
                {"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(retry_after)}
            )
        expected = self.app_token if method == "apps.connections.open" else self.bot_token
        if method not in BOT_METHODS | {"apps.connections.open"}:
            return web.json_response({"ok": False, "error": "unknown_method"})
        if token != expected:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        body = self._handle(method, args)
        self._notify()
        return web.json_response(body)

    def _handle(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        if method == "auth.test":
            return {
                "ok": True,
                "url": "https://fake.slack.com/",
                "team": "Fake Team",
                "user": "minigpt4",
                "team_id": self.team,
                "user_id": self.bot_user,
                "bot_id": self.bot_id,
                "is_enterprise_install": False,
            }
        if method == "apps.connections.open":
            self.connections += 1
            return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/link"}
        if method == "files.getUploadURLExternal":
            if "files:write" not in self.scopes:
                return {"ok": False, "error": "missing_scope", "needed": "files:write", "provided": "chat:write"}
            file_id = "F" + uuid.uuid4().hex[:10].upper()
            self.uploads[file_id] = {"filename": args.get("filename"), "length": int(args.get("length", 0))}
            return {"ok": True, "upload_url": f"{self.base}/upload/{file_id}", "file_id": file_id}
        if method == "files.completeUploadExternal":
            shared = []
            for item in json.loads(args.get("files", "[]")):
                upload = self.uploads.get(item.get("id", ""))
                if upload is None or "data" not in upload:
                    return {"ok": False, "error": "file_not_found"}
                upload.update(title=item.get("title"), channel=args.get("channel_id"), thread_ts=args.get("thread_ts"))
                shared.append({"id": item["id"], "name": upload["filename"], "title": item.get("title")})
            return {"ok": True, "files": shared}
        if method == "conversations.replies":
            thread = self.thread(args["channel"], args["ts"], deleted=False)
            return {"ok": True, "messages": [self._json(m) for m in thread]}
        channel = args.get("channel", "")
        text = args.get("text", "")
        if len(text) > 4000:
            return {"ok": False, "error": "msg_too_long"}
        if method == "chat.postMessage":
            message = Message(channel, self.new_ts(), text, self.bot_user, args.get("thread_ts"), self.bot_id)
            message.edits.append((self.clock(), text))
            self.messages.setdefault(channel, []).append(message)
            self._echo({"type": "message", **self._json(message)})
            return {"ok": True, "channel": channel, "ts": message.ts, "message": self._json(message)}
        if method == "chat.postEphemeral":
            self.ephemerals.append(
                {
                    "channel": channel,
                    "user": args.get("user"),
                    "text": text,
                    "thread_ts": args.get("thread_ts"),
                    "at": self.clock(),
                }
            )
            return {"ok": True, "message_ts": self.new_ts()}
        message = self.find(channel, args.get("ts", ""))
        if message is None or message.deleted:
            return {"ok": False, "error": "message_not_found"}
        if message.user != self.bot_user:
            return {"ok": False, "error": "cant_update_message" if method == "chat.update" else "cant_delete_message"}
        if method == "chat.update":
            previous = self._json(message)
            message.text = text
            message.edits.append((self.clock(), text))
            self._echo(
                {
                    "type": "message",
                    "subtype": "message_changed",
                    "channel": channel,
                    "hidden": True,
                    "message": self._json(message),
                    "previous_message": previous,
                    "ts": self.new_ts(),
                }
            )
            return {"ok": True, "channel": channel, "ts": message.ts, "text": text}
        message.deleted = True  # chat.delete
        self._echo(
            {
                "type": "message",
                "subtype": "message_deleted",
                "channel": channel,
                "hidden": True,
                "deleted_ts": message.ts,
                "previous_message": self._json(message),
                "ts": self.new_ts(),
            }
        )
        return {"ok": True, "channel": channel, "ts": message.ts}

    def _json(self, m: Message) -> dict[str, Any]:
        data = {"ts": m.ts, "text": m.text, "user": m.user, "channel": m.channel}
        if m.thread_ts:
            data["thread_ts"] = m.thread_ts
        if m.bot_id:
            data["bot_id"] = m.bot_id
        return data

    def _echo(self, event: dict[str, Any]) -> None:
        if self.echo and self._ws is not None:
            event.setdefault("channel_type", "im" if event.get("channel", "").startswith("D") else "channel")
            asyncio.get_running_loop().create_task(self.send_event(event))

    # ------------------------------------------------------------------ state

    def find(self, channel: str, ts: str) -> Message | None:
        return next((m for m in self.messages.get(channel, []) if m.ts == ts), None)

    def thread(self, channel: str, thread_ts: str, deleted: bool = False) -> list[Message]:
        return [
            m
            for m in self.messages.get(channel, [])
            if (m.ts == thread_ts or m.thread_ts == thread_ts) and (deleted or not m.deleted)
        ]

    def bot_replies(self, channel: str, thread_ts: str) -> list[Message]:
        return [m for m in self.thread(channel, thread_ts) if m.user == self.bot_user]

    # ------------------------------------------------------------------ files

    def add_file(
        self,
        data: bytes,
        name: str = "photo.png",
        mimetype: str = "image/png",
        *,
        login_page: bool = False,
        size: int | None = None,
    ) -> dict[str, Any]:
        """Store a file; returns its ``files[]`` entry.  ``login_page``: always answer HTML (no files:read)."""
        file_id = "F" + uuid.uuid4().hex[:10].upper()
        self.files[file_id] = {"data": data, "mimetype": mimetype, "login_page": login_page}
        url = f"{self.base}/files/{file_id}/{name}"
        return {
            "id": file_id,
            "name": name,
            "title": name,
            "mimetype": mimetype,
            "filetype": name.rsplit(".", 1)[-1],
            "size": len(data) if size is None else size,
            "url_private": url,
            "url_private_download": url + "?dl=1",
        }

    async def _upload(self, request: web.Request) -> web.Response:
        """Step 2 of files_upload_v2: the bytes, POSTed to the URL step 1 handed out."""
        upload = self.uploads.get(request.match_info["id"])
        if upload is None:
            return web.Response(status=404)
        data = await request.read()
        if len(data) != upload["length"]:
            return web.Response(status=400, text=f"expected {upload['length']} bytes, got {len(data)}")
        upload["data"] = data
        self._notify()
        return web.Response(text="OK - " + str(len(data)))

    def shared_files(self, channel: str, thread_ts: str) -> list[dict[str, Any]]:
        """Files completed into a thread, in upload order."""
        return [u for u in self.uploads.values() if u.get("channel") == channel and u.get("thread_ts") == thread_ts]

    async def _file(self, request: web.Request) -> web.StreamResponse:
        stored = self.files.get(request.match_info["id"])
        authorized = request.headers.get("Authorization") == f"Bearer {self.bot_token}"
        self.downloads.append({"id": request.match_info["id"], "authorized": authorized})
        self._notify()
        if self.file_gate is not None:  # a slow download: the test decides when it goes on
            await self.file_gate.wait()
        if stored is None:
            return web.Response(status=404)
        if not authorized or stored["login_page"]:
            return web.Response(text=LOGIN_PAGE, content_type="text/html")
        response = web.StreamResponse(headers={"Content-Type": stored["mimetype"]})
        await response.prepare(request)
        data = stored["data"]
        try:
            for i in range(0, len(data), 32 * 1024):
                await response.write(data[i : i + 32 * 1024])
            await response.write_eof()
        except ConnectionError:  # the client stopped reading (over its size cap)
            stored["aborted"] = True
        return response

    async def _respond(self, request: web.Request) -> web.Response:
        self.responses.append({"id": request.match_info["id"], "at": self.clock(), **(await request.json())})
        self._notify()
        return web.Response(text="ok")

    # ------------------------------------------------------------------ payloads

    def user_message(
        self,
        channel: str,
        text: str,
        *,
        user: str = "UALICE",
        files: list[dict] | None = None,
        thread_ts: str | None = None,
        kind: str = "message",
    ) -> dict[str, Any]:
        """Record a user's message in the channel; returns the ``event`` Slack would send for it."""
        message = Message(channel, self.new_ts(), text, user, thread_ts)
        message.edits.append((self.clock(), text))
        self.messages.setdefault(channel, []).append(message)
        event: dict[str, Any] = {
            "type": kind,
            "user": user,
            "text": text,
            "ts": message.ts,
            "channel": channel,
            "event_ts": message.ts,
            "team": self.team,
        }
        if kind == "message":
            event["channel_type"] = "im" if channel.startswith("D") else "channel"
        if thread_ts:
            event["thread_ts"] = thread_ts
        if files:
            event["files"] = files
            if kind == "message":
                event["subtype"] = "file_share"
        return event

    def mention(self, channel: str, text: str, **kwargs: Any) -> dict[str, Any]:
        return self.user_message(channel, f"<@{self.bot_user}> {text}", kind="app_mention", **kwargs)

    def picture_mention(
        self, picture: bytes, text: str = "What is this?", channel: str = "C0GENERAL"
    ) -> dict[str, Any]:
        """A user mentions the bot in ``channel`` with ``picture`` shared (the start of most conversation tests)."""
        return self.mention(channel, text, files=[self.add_file(picture)])

    async def ask(self, picture: bytes, text: str = "What is this?", channel: str = "C0GENERAL") -> str:
        """Send :meth:`picture_mention` and wait for its ack; the ``ts`` of the thread the answer goes to."""
        mention = self.picture_mention(picture, text, channel)
        await self.wait_ack(await self.send_event(mention))
        return str(mention["ts"])

    def command_payload(
        self, text: str = "", *, command: str = "/minigpt4", user: str = "UALICE", channel: str = "C0GENERAL"
    ) -> dict[str, Any]:
        return {
            "token": "legacy",
            "team_id": self.team,
            "team_domain": "fake",
            "channel_id": channel,
            "channel_name": "general",
            "user_id": user,
            "user_name": "alice",
            "command": command,
            "text": text,
            "api_app_id": "A0FAKE",
            "is_enterprise_install": "false",
            "response_url": f"{self.base}/respond/{uuid.uuid4().hex[:8]}",
            "trigger_id": "1.2.3",
        }
