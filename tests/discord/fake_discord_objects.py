"""The fake Discord's records and wire constants (``fake_discord.py`` serves them): message, channel and
interaction state, the REST route table, snowflakes."""

from __future__ import annotations

import datetime
import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

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


class _Refuse(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response
