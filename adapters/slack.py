"""The Slack front end (slack_bolt ``AsyncApp``): events in, a core ``Request`` out, replies in threads.

* ``@minigpt4 question`` + a picture in a channel (``app_mention``) answers in the thread rooted at that
  message; later messages in that thread continue the conversation without a mention (a ``message``
  event in a thread whose live conversation is in storage, or a picture in a thread the bot was
  mentioned in since start, e.g. after ``reset``); DMs (``message.im``) need no mention.
* ``/minigpt4`` (the configured slash command) is acknowledged at once, then answers with help and
  presets (ephemeral); ``/minigpt4 <preset>`` explains a preset, ``/minigpt4 settings`` shows the limits.
* Transports: Socket Mode by default (``SLACK_APP_TOKEN``), or the HTTP Events API on aiohttp
  (``SLACK_SIGNING_SECRET``, path ``/slack/events``) — the same listeners.  ``SLACK_BOT_TOKEN`` always.
  Every Web API call goes to ``[slack] api_url`` (GovSlack: ``https://slack-gov.com/api/``).
* Redeliveries (``X-Slack-Retry-Num`` / Socket Mode ``retry_attempt``) are acked by bolt and dropped by
  the core's SQL dedup: the Slack ``event_id`` is the request's ``event_id``.  Bot messages and edits
  (``message_changed`` …) are ignored.
* Answers stream into a placeholder with ``chat.update``, throttled per workspace
  (:class:`~adapters.slack_format.TokenBucket`) and per answer; long answers continue in further
  messages (:func:`~adapters.slack_format.split_message`).  429s are retried after ``Retry-After``
  by slack_sdk's ``AsyncRateLimitErrorRetryHandler``.  Ephemeral core replies (quota, access, bad
  input) go to the user alone with ``chat.postEphemeral``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack_format import ThreadReply, TokenBucket, escape_mrkdwn, strip_mention
from bot.core.config import Settings, SlackSettings
from bot.core.images import format_size
from bot.core.requests import Final, ImageAttachment, ReplyEvent, Request
from bot.core.service import BotService
from storage import ConversationKey

__all__ = ["EVENTS_PATH", "SlackAdapter", "SlackSetupError", "SlackTokens", "make_client", "start_slack"]

log = logging.getLogger(__name__)

PLATFORM = "slack"
BOT_TOKEN_ENV, APP_TOKEN_ENV, SIGNING_SECRET_ENV = "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"
EVENTS_PATH = "/slack/events"
ACCEPTED_SUBTYPES = (None, "file_share", "thread_broadcast")
MENTIONED_THREADS = 10_000  # remembered so a picture posted after the mention needs no second mention
FILES_READ = (
    "Slack sent a login page instead of {name}: this app is missing the `files:read` scope. "
    "Ask a workspace admin to add it (OAuth & Permissions) and reinstall the app."
)


class SlackSetupError(RuntimeError):
    """Slack cannot start: a token is missing or rejected, or Slack cannot be reached."""


class DownloadError(Exception):
    def __init__(self, user_message: str) -> None:
        super().__init__(user_message)
        self.user_message = user_message


@dataclass(frozen=True)
class SlackTokens:
    """Credentials from the environment; never logged (hidden from ``repr``)."""

    bot: str = field(repr=False)
    app: str = field(default="", repr=False)
    signing_secret: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, mode: str, environ: Mapping[str, str] = os.environ) -> SlackTokens:
        second = APP_TOKEN_ENV if mode == "socket" else SIGNING_SECRET_ENV
        values = {name: environ.get(name, "").strip() for name in (BOT_TOKEN_ENV, APP_TOKEN_ENV, SIGNING_SECRET_ENV)}
        missing = [name for name in (BOT_TOKEN_ENV, second) if not values[name]]
        if missing:
            raise SlackSetupError(f"[slack] mode = {mode!r} needs {' and '.join(missing)} in the environment")
        if not values[BOT_TOKEN_ENV].startswith("xoxb-"):
            raise SlackSetupError(f"{BOT_TOKEN_ENV} must be the bot token (xoxb-…)")
        if mode == "socket" and not values[APP_TOKEN_ENV].startswith("xapp-"):
            raise SlackSetupError(f"{APP_TOKEN_ENV} must be an app-level token (xapp-…) with connections:write")
        return cls(values[BOT_TOKEN_ENV], values[APP_TOKEN_ENV], values[SIGNING_SECRET_ENV])


def make_client(token: str, api_url: str, session: aiohttp.ClientSession | None = None) -> AsyncWebClient:
    """A Web API client on ``api_url`` that waits out 429s (``Retry-After``) up to three times."""
    retries = [AsyncConnectionErrorRetryHandler(), AsyncRateLimitErrorRetryHandler(max_retry_count=3)]
    return AsyncWebClient(token=token, base_url=api_url, session=session, retry_handlers=retries)


async def start_slack(service: BotService, settings: Settings, environ: Mapping[str, str] = os.environ) -> SlackAdapter:
    """Read the tokens, connect (Socket Mode) or listen (HTTP); the caller awaits ``cleanup()``."""
    adapter = SlackAdapter(service, SlackTokens.from_env(settings.slack.mode, environ), settings.slack)
    try:
        await adapter.start()
    except BaseException:
        await adapter.cleanup()
        raise
    return adapter


def _no_fence(text: str) -> str:
    return escape_mrkdwn(text).replace("```", "`\u200b`\u200b`")


class SlackAdapter:
    """The bolt app, its listeners and one transport; construct it inside a running event loop."""

    def __init__(
        self,
        service: BotService,
        tokens: SlackTokens,
        settings: SlackSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self.service, self.tokens = service, tokens
        self.settings = settings or service.settings.slack
        self.clock, self.sleep, self.connect_timeout_s = clock, sleep, connect_timeout_s
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120, sock_read=30))
        self.client = make_client(tokens.bot, self.settings.api_url, self.http)
        self.app = AsyncApp(
            client=self.client,
            signing_secret=tokens.signing_secret,
            name="minigpt4-bot",
            request_verification_enabled=self.settings.mode == "http",
        )
        self.app.event("app_mention")(self._on_mention)
        self.app.event("message")(self._on_message)
        self.app.command(self.settings.slash_command)(self._on_command)
        self.http_port: int | None = None
        self._buckets: dict[str, TokenBucket] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._socket: Any = None
        self._mentioned: OrderedDict[ConversationKey, None] = OrderedDict()  # threads mentioned in, this run
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        try:
            auth = await self.client.auth_test()
        except SlackApiError as exc:
            raise SlackSetupError(f"Slack rejected {BOT_TOKEN_ENV}: {exc.response.get('error')}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SlackSetupError(f"cannot reach the Slack Web API at {self.settings.api_url}: {exc}") from None
        log.info("Slack: workspace %s (%s), bot user %s", auth.get("team"), auth.get("team_id"), auth.get("user_id"))
        if self.settings.mode == "socket":
            from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

            self._socket = AsyncSocketModeHandler(self.app, self.tokens.app, web_client=self.client)
            try:
                await asyncio.wait_for(self._socket.connect_async(), self.connect_timeout_s)
            except TimeoutError:
                raise SlackSetupError(
                    f"no Socket Mode connection after {self.connect_timeout_s:.0f} s: check {APP_TOKEN_ENV} "
                    "(connections:write) and that Socket Mode is enabled for the app"
                ) from None
            log.info("Slack: Socket Mode connected")
        else:
            self._runner = web.AppRunner(self.app.web_app(path=EVENTS_PATH), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, self.settings.http_host, self.settings.http_port).start()
            self.http_port = next(a[1] for a in self._runner.addresses if isinstance(a, tuple))
            log.info("Slack: Events API on http://%s:%s%s", self.settings.http_host, self.http_port, EVENTS_PATH)

    async def cleanup(self) -> None:
        """Stop receiving, interrupt answers in flight (their placeholders say so), close connections."""
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await self._socket.close_async()
        if self._runner is not None:
            await self._runner.cleanup()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.close()

    def bucket(self, team: str) -> TokenBucket:
        """The workspace's ``chat.update`` budget, shared by every answer streaming there."""
        if team not in self._buckets:
            self._buckets[team] = TokenBucket(self.settings.updates_per_minute, clock=self.clock, sleep=self.sleep)
        return self._buckets[team]

    def _reply(self, team: str, channel: str, thread: str, user: str, in_thread: bool) -> ThreadReply:
        s = self.settings
        return ThreadReply(
            self.client, self.bucket(team), channel, thread, user, in_thread,
            limit=s.max_message_chars, interval_s=s.update_interval_s, clock=self.clock, sleep=self.sleep,
        )  # fmt: skip

    @contextlib.contextmanager
    def _tracked(self) -> Any:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ listeners

    async def _on_mention(self, body: dict, event: dict, context: Any) -> None:
        if event.get("bot_id") or not event.get("user") or event["channel"].startswith("D"):
            return  # bots; DMs arrive as message.im (never answer one message twice)
        thread = event.get("thread_ts") or event["ts"]
        self._mentioned[ConversationKey(PLATFORM, self._team(body, context), event["channel"], thread)] = None
        while len(self._mentioned) > MENTIONED_THREADS:
            self._mentioned.popitem(last=False)
        await self._handle(body, event, context, thread)

    async def _on_message(self, body: dict, event: dict, context: Any) -> None:
        if event.get("subtype") not in ACCEPTED_SUBTYPES or event.get("bot_id") or not event.get("user"):
            return  # edits, deletions, joins, other bots (and bolt already drops our own messages)
        if event.get("channel_type") == "im":
            await self._handle(body, event, context, event.get("thread_ts") or event["ts"])
            return
        thread = event.get("thread_ts")
        if not thread or (context.bot_user_id and f"<@{context.bot_user_id}" in event.get("text", "")):
            return  # not a thread reply, or a mention (answered through its app_mention event)
        key = ConversationKey(PLATFORM, self._team(body, context), event["channel"], thread)
        picture_for_us = bool(event.get("files")) and key in self._mentioned  # e.g. after `reset`, or forgotten
        if picture_for_us or await self.service.db.live_conversation(key) is not None:
            await self._handle(body, event, context, thread)

    async def _on_command(self, ack: Any, command: dict, respond: Any, context: Any) -> None:
        await ack()  # within Slack's 3 s, before any work
        with self._tracked():
            try:
                text = await self._command_reply(command, context)
                await respond(text=text, response_type="ephemeral")
            except Exception:
                log.exception("slash command %s failed", self.settings.slash_command)

    # ------------------------------------------------------------------ messages → core

    def _team(self, body: dict, context: Any) -> str:
        return body.get("team_id") or context.team_id or ""

    async def _handle(self, body: dict, event: dict, context: Any, thread: str) -> None:
        with self._tracked():
            team, channel, user = self._team(body, context), event["channel"], event["user"]
            event_id = body.get("event_id")
            log.info("slack %s %s in %s/%s thread %s", event.get("type"), event_id, team, channel, thread)
            reply = self._reply(team, channel, thread, user, in_thread="thread_ts" in event)
            try:
                images = await self._download(event.get("files") or [])
            except DownloadError as exc:
                if event_id and not await self.service.db.mark_event(PLATFORM, event_id):
                    return  # a redelivery of a message we already answered
                await reply.run(_one(Final(exc.user_message, kind="error", ephemeral=True)))
                return
            text = strip_mention(event.get("text", ""), context.bot_user_id)
            request = Request(PLATFORM, team, channel, thread, user, text, images, event_id=event_id)
            await reply.run(self.service.handle(request))

    async def _download(self, files: list[dict]) -> tuple[ImageAttachment, ...]:
        limits = self.service.settings.images
        if len(files) > limits.max_per_message:
            raise DownloadError(f"Please send at most {limits.max_per_message} pictures per message.")
        cap = self.settings.max_image_bytes or limits.max_bytes
        return tuple([await self._download_one(f, cap) for f in files])

    async def _download_one(self, file: dict, cap: int) -> ImageAttachment:
        name, mime = file.get("name") or file.get("title") or "the picture", file.get("mimetype") or ""
        too_big = f"{name} is larger than {format_size(cap)}, the most I accept; please send a smaller picture."
        if mime and not mime.startswith("image/"):
            raise DownloadError(f"{name} is not a picture ({mime}); I read JPEG, PNG, GIF and WebP.")
        if int(file.get("size") or 0) > cap:
            raise DownloadError(too_big)
        url = file.get("url_private_download") or file.get("url_private")
        if not url or not self._slack_hosted(url):
            raise DownloadError(f"I can't open {name}: Slack did not share a download link. Please upload it here.")
        try:
            async with self.http.get(url, headers={"Authorization": f"Bearer {self.tokens.bot}"}) as response:
                if response.status != 200:
                    raise DownloadError(f"Slack answered HTTP {response.status} for {name}; please upload it again.")
                if response.content_type == "text/html":
                    raise DownloadError(FILES_READ.format(name=name))
                data = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    data += chunk
                    if len(data) > cap:
                        raise DownloadError(too_big)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("downloading a Slack file failed: %s", type(exc).__name__)
            raise DownloadError(f"I couldn't download {name} from Slack; please try again.") from None
        return ImageAttachment(bytes(data), filename=name, mime=mime)

    def _slack_hosted(self, url: str) -> bool:
        """The bot token is sent only to Slack's own file hosts (or the configured API host)."""
        target, api = urlsplit(url), urlsplit(self.settings.api_url)
        if (target.scheme, target.netloc) == (api.scheme, api.netloc):
            return True
        host = target.hostname or ""
        slack_host = host in ("slack.com", "slack-gov.com") or host.endswith((".slack.com", ".slack-gov.com"))
        return target.scheme == "https" and slack_host

    async def _command_reply(self, command: dict, context: Any) -> str:
        words = (command.get("text") or "").split()
        word = words[0].lower().lstrip("/") if words else "help"
        book, bot = self.service.presets, f"<@{context.bot_user_id}>" if context.bot_user_id else "me"
        team, channel = command.get("team_id") or context.team_id or "", command.get("channel_id", "")
        if word == "settings":
            request = Request(PLATFORM, team, channel, "slash-command", command.get("user_id", ""), "settings")
            return "\n".join([e.text async for e in self.service.handle(request) if isinstance(e, Final)])
        if word in book.names:
            return (
                f"*`{word}`* — {_no_fence(book.prompt(word, team, channel))}\n"
                f"To use it, mention {bot} in a channel (or DM me) with a picture and start the message with "
                f"`{word}`, e.g. {bot} {word}. Anything after the name is added to the prompt. In a thread that "
                "already has a picture it works without a new one."
            )
        presets = "\n".join(f"   • `{n}` — {_no_fence(book.prompt(n, team, channel))}" for n in book.names)
        intro = "" if word == "help" else f"I don't know `{_no_fence(word)}`.\n"
        return intro + (
            "*MiniGPT-4* answers questions about pictures.\n"
            f"• In a channel, mention {bot} with a picture and a question: I answer in a thread. "
            "Reply in that thread to follow up — no mention needed; new pictures join the conversation.\n"
            "• In a DM, just send a picture and a question.\n"
            f"• Start a message with a preset name to use its prompt:\n{presets}\n"
            f"• `reset` in a thread starts it over; `settings` (or `{self.settings.slash_command} settings`) "
            "shows the model and your limits."
        )


async def _one(event: ReplyEvent) -> AsyncIterator[ReplyEvent]:
    yield event
