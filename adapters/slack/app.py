"""The Slack front end (slack_bolt ``AsyncApp``): its listeners and lifecycle.

* ``@minigpt4 question`` + a picture in a channel (``app_mention``) answers in the thread rooted at that
  message; later messages in that thread continue the conversation without a mention (a ``message``
  event in a thread the core calls ``live``, or a picture in a thread it ``followed`` since a mention,
  e.g. after ``reset`` — also after a restart); DMs (``message.im``) need no mention.
* ``/minigpt4`` (the configured slash command) is acknowledged at once, then answers with help and
  presets (ephemeral); ``/minigpt4 <preset>`` explains a preset, ``/minigpt4 settings`` shows the limits.
* Transports: Socket Mode by default (``SLACK_APP_TOKEN``), or the HTTP Events API on aiohttp
  (``SLACK_SIGNING_SECRET``, path ``/slack/events``) — the same listeners.  ``SLACK_BOT_TOKEN`` always.
  Every Web API call goes to ``[slack] api_url`` (GovSlack: ``https://slack-gov.com/api/``).
* Redeliveries (``X-Slack-Retry-Num`` / Socket Mode ``retry_attempt``) are acked by bolt and dropped by
  the core: the Slack ``event_id`` is the request's ``event_id``; their pictures are not downloaded again
  (``Core.seen_event``), also when two copies arrive at once (:class:`OneDeliveryAtATime`).  Bot messages
  and edits (``message_changed`` …) are ignored.
* Answers stream into a placeholder (:class:`~adapters.streaming.StreamedReply` over
  :class:`~adapters.slack.messages.SlackThread`), ``chat.update``s throttled per workspace and per answer;
  long answers continue in further messages.  429s are retried after ``Retry-After`` by slack_sdk's
  ``AsyncRateLimitErrorRetryHandler``.  Ephemeral core replies (quota, access, bad input) go to the
  user alone with ``chat.postEphemeral``.

The front end uses nothing of the core but :class:`~bot.core.frontend_api.Core`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from adapters.lifecycle import start_or_undo
from adapters.slack.files import SlackFiles
from adapters.slack.http import events_app
from adapters.slack.messages import SlackThread, escape_mrkdwn, no_fence, slack_format, strip_mention
from adapters.slack.settings import SlackSettings
from adapters.streaming import InFlight, StreamedReply, TokenBucket
from bot.core.frontend_api import Core, FrontEndSetupError
from bot.core.requests import Command, Final, ImageAttachment, Request, ThreadRef
from bot.core.shutdown import close_quietly

__all__ = ["EVENTS_PATH", "PLATFORM", "OneDeliveryAtATime", "SlackFrontEnd", "SlackTokens", "make_client"]

log = logging.getLogger(__name__)

PLATFORM = "slack"
BOT_TOKEN_ENV, APP_TOKEN_ENV, SIGNING_SECRET_ENV = "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"
EVENTS_PATH = "/slack/events"
ACCEPTED_SUBTYPES = (None, "file_share", "thread_broadcast")


@dataclass(frozen=True)
class SlackTokens:
    """Credentials from the environment; never logged (hidden from ``repr``)."""

    bot: str = field(repr=False)
    app: str = field(default="", repr=False)
    signing_secret: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, mode: str, environ: Mapping[str, str] = os.environ) -> SlackTokens:
        """The tokens ``mode`` needs, or :class:`FrontEndSetupError` naming what is missing (never a value)."""
        second = APP_TOKEN_ENV if mode == "socket" else SIGNING_SECRET_ENV
        values = {name: environ.get(name, "").strip() for name in (BOT_TOKEN_ENV, APP_TOKEN_ENV, SIGNING_SECRET_ENV)}
        missing = [name for name in (BOT_TOKEN_ENV, second) if not values[name]]
        if missing:
            raise FrontEndSetupError(f"[slack] mode = {mode!r} needs {' and '.join(missing)} in the environment")
        if not values[BOT_TOKEN_ENV].startswith("xoxb-"):
            raise FrontEndSetupError(f"{BOT_TOKEN_ENV} must be the bot token (xoxb-…) from OAuth & Permissions")
        if mode == "socket" and not values[APP_TOKEN_ENV].startswith("xapp-"):
            raise FrontEndSetupError(f"{APP_TOKEN_ENV} must be an app-level token (xapp-…) with connections:write")
        return cls(values[BOT_TOKEN_ENV], values[APP_TOKEN_ENV], values[SIGNING_SECRET_ENV])


def make_client(token: str, api_url: str, session: aiohttp.ClientSession | None = None) -> AsyncWebClient:
    """A Web API client on ``api_url`` that waits out 429s (``Retry-After``) up to three times."""
    retries = [AsyncConnectionErrorRetryHandler(), AsyncRateLimitErrorRetryHandler(max_retry_count=3)]
    return AsyncWebClient(token=token, base_url=api_url, session=session, retry_handlers=retries)


class OneDeliveryAtATime:
    """The deliveries of one Slack event, handled one after another in this process.

    Slack redelivers an event it thinks was lost, and two copies can arrive at the same moment (a retry
    while the first is still downloading).  :meth:`Core.seen_event <bot.core.frontend_api.Core.seen_event>` is a
    read, so both would get ``False`` and both would fetch the files; here the second waits until the
    first is handled, then asks ``seen_event`` like any redelivery — nothing is fetched again unless the
    first's answer failed (then the retry is answered, as the core's rule says).
    """

    def __init__(self) -> None:
        self._busy: dict[str, asyncio.Event] = {}

    @contextlib.asynccontextmanager
    async def hold(self, event_id: str | None) -> AsyncIterator[None]:
        """Handle ``event_id`` inside this block once no other delivery of it is (no id: at once)."""
        if not event_id:
            yield
            return
        while (busy := self._busy.get(event_id)) is not None:
            log.info("slack event %s: another delivery of it is being handled; this one waits for it", event_id)
            await busy.wait()
        done = self._busy[event_id] = asyncio.Event()
        try:
            yield
        finally:
            del self._busy[event_id]
            done.set()


class SlackFrontEnd:
    """The bolt app, its listeners and one transport.  Building it does nothing; :meth:`start` reads the
    tokens from ``environ``, checks them with ``auth.test`` and connects (Socket Mode) or listens (HTTP).

    ``environ``, ``clock`` and ``sleep`` may be replaced before :meth:`start` (tests run the edit budget on
    a fast clock).
    """

    name = PLATFORM

    def __init__(
        self,
        core: Core,
        settings: SlackSettings,
        *,
        environ: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self.core, self.settings, self.environ = core, settings, environ
        self.clock, self.sleep, self.connect_timeout_s = clock, sleep, connect_timeout_s
        self.http: aiohttp.ClientSession | None = None
        self.client: AsyncWebClient | None = None
        self.app: AsyncApp | None = None
        self.files: SlackFiles | None = None
        self.http_port: int | None = None
        self._buckets: dict[str, TokenBucket] = {}
        self._in_flight = InFlight()
        self._deliveries = OneDeliveryAtATime()
        self._socket: Any = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await start_or_undo(self._start(SlackTokens.from_env(self.settings.mode, self.environ)), self.stop)

    async def _start(self, tokens: SlackTokens) -> None:
        s = self.settings
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120, sock_read=30))
        self.client = make_client(tokens.bot, s.api_url, self.http)
        self.files = SlackFiles(self.http, tokens.bot, s.api_url, lambda: self.core.image_limits, s.max_image_bytes)
        self.app = AsyncApp(
            client=self.client,
            signing_secret=tokens.signing_secret,
            name="minigpt4-bot",
            request_verification_enabled=s.mode == "http",
        )
        self.app.event("app_mention")(self._on_mention)
        self.app.event("message")(self._on_message)
        self.app.command(s.slash_command)(self._on_command)
        try:
            auth = await self.client.auth_test()
        except SlackApiError as exc:
            error = exc.response.get("error")
            raise FrontEndSetupError(
                f"Slack rejected {BOT_TOKEN_ENV}: {error} (copy the bot token again from OAuth & Permissions)"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FrontEndSetupError(f"cannot reach the Slack Web API at {s.api_url}: {exc}") from None
        log.info("Slack: workspace %s (%s), bot user %s", auth.get("team"), auth.get("team_id"), auth.get("user_id"))
        if s.mode == "socket":
            await self._connect(tokens)
        else:
            self._runner = web.AppRunner(events_app(self.app, tokens.signing_secret, EVENTS_PATH), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, s.http_host, s.http_port).start()
            self.http_port = next(a[1] for a in self._runner.addresses if isinstance(a, tuple))
            log.info("Slack: Events API on http://%s:%s%s", s.http_host, self.http_port, EVENTS_PATH)

    async def _connect(self, tokens: SlackTokens) -> None:
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

        assert self.app is not None  # start() built it
        self._socket = AsyncSocketModeHandler(self.app, tokens.app, web_client=self.client)
        try:
            await asyncio.wait_for(self._socket.connect_async(), self.connect_timeout_s)
        except TimeoutError:
            raise FrontEndSetupError(
                f"no Socket Mode connection after {self.connect_timeout_s:.0f} s: check {APP_TOKEN_ENV} "
                "(connections:write) and that Socket Mode is enabled for the app"
            ) from None
        log.info("Slack: Socket Mode connected")

    async def stop(self) -> None:
        """Stop receiving, interrupt answers in flight (their placeholders say so), close connections."""
        socket, self._socket = self._socket, None
        await close_quietly(socket.close_async if socket is not None else None)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._in_flight.cancel_all()
        http, self.http = self.http, None
        if http is not None:
            await http.close()

    async def problem(self) -> str | None:
        """Readiness: the Socket Mode websocket is up (slack_sdk reconnects a lost one by itself; until it
        has, this says so), or the Events API endpoint listens.  Calls no Slack API."""
        if self.settings.mode == "socket":
            socket = self._socket
            if socket is None:
                return "Socket Mode not connected"
            if not await socket.client.is_connected():
                return "Socket Mode connection lost (reconnecting)"
            return None
        runner = self._runner
        return None if runner is not None and runner.sites else f"Events API not listening on {EVENTS_PATH}"

    def bucket(self, team: str) -> TokenBucket:
        """The workspace's ``chat.update`` budget, shared by every answer streaming there."""
        if team not in self._buckets:
            self._buckets[team] = TokenBucket(self.settings.updates_per_minute, clock=self.clock, sleep=self.sleep)
        return self._buckets[team]

    def _reply(self, team: str, channel: str, thread: str, user: str, in_thread: bool) -> StreamedReply:
        s = self.settings
        return StreamedReply(
            SlackThread(self.client, channel, thread, user, in_thread), self.bucket(team),
            slack_format(s.max_message_chars), interval_s=s.update_interval_s, clock=self.clock, sleep=self.sleep,
        )  # fmt: skip

    # ------------------------------------------------------------------ listeners

    async def _on_mention(self, body: dict, event: dict, context: Any) -> None:
        if event.get("bot_id") or not event.get("user") or event["channel"].startswith("D"):
            return  # bots; DMs arrive as message.im (never answer one message twice)
        await self._handle(body, event, context, event.get("thread_ts") or event["ts"], addressed=True)

    async def _on_message(self, body: dict, event: dict, context: Any) -> None:
        if event.get("subtype") not in ACCEPTED_SUBTYPES or event.get("bot_id") or not event.get("user"):
            return  # edits, deletions, joins, other bots (and bolt already drops our own messages)
        if event.get("channel_type") == "im":
            await self._handle(body, event, context, event.get("thread_ts") or event["ts"], addressed=True)
            return
        thread = event.get("thread_ts")
        if not thread or (context.bot_user_id and f"<@{context.bot_user_id}" in event.get("text", "")):
            return  # not a thread reply, or a mention (answered through its app_mention event)
        view = await self.core.thread(ThreadRef(PLATFORM, self._team(body, context), event["channel"], thread))
        if view.live or (bool(event.get("files")) and view.followed):  # a picture after a mention or `reset`
            await self._handle(body, event, context, thread, addressed=False)

    async def _on_command(self, ack: Any, command: dict, respond: Any, context: Any) -> None:
        await ack()  # within Slack's 3 s, before any work
        with self._in_flight.track():
            try:
                text = await self._command_reply(command, context)
                await respond(text=text, response_type="ephemeral")
            except Exception:
                log.exception("slash command %s failed", self.settings.slash_command)

    # ------------------------------------------------------------------ messages → core

    def _team(self, body: dict, context: Any) -> str:
        return body.get("team_id") or context.team_id or ""

    async def _handle(self, body: dict, event: dict, context: Any, thread: str, *, addressed: bool) -> None:
        assert self.files is not None
        with self._in_flight.track():
            team, channel, user = self._team(body, context), event["channel"], event["user"]
            event_id = body.get("event_id")
            log.info("slack %s %s in %s/%s thread %s", event.get("type"), event_id, team, channel, thread)
            async with self._deliveries.hold(event_id):
                reply = self._reply(team, channel, thread, user, in_thread="thread_ts" in event)
                images = await self._pictures(event, event_id)
                text = strip_mention(event.get("text", ""), context.bot_user_id)
                request = Request(
                    PLATFORM, team, channel, thread, user, text, images, event_id=event_id, addressed=addressed
                )
                await reply.run(self.core.handle(request))

    async def _pictures(self, event: dict, event_id: str | None) -> tuple[ImageAttachment, ...]:
        """The message's pictures — none fetched for an event the core will drop as a redelivery (Slack
        retries an event it thinks was lost, and serves its files again each time).  The request still goes
        to the core, which drops it, counts it and logs it; deliveries arriving together are asked one after
        another (:class:`OneDeliveryAtATime`), so the second finds the first recorded."""
        assert self.files is not None
        files = event.get("files") or []
        if files and event_id and await self.core.seen_event(PLATFORM, event_id):
            return ()
        return await self.files.download(files)

    async def _command_reply(self, command: dict, context: Any) -> str:
        words = (command.get("text") or "").split()
        word = words[0].lower().lstrip("/") if words else "help"
        bot = f"<@{context.bot_user_id}>" if context.bot_user_id else "me"
        team, channel = command.get("team_id") or context.team_id or "", command.get("channel_id", "")
        if word == "settings":  # a command with no thread: the core follows none (Request.command)
            request = Request(PLATFORM, team, channel, "", command.get("user_id", ""), command=Command.SETTINGS)
            texts = [escape_mrkdwn(e.text) async for e in self.core.handle(request) if isinstance(e, Final)]
            return "\n".join(texts)
        presets = {p.name: p.prompt for p in self.core.presets(team, channel)}
        if word in presets:
            return (
                f"*`{word}`* — {no_fence(presets[word])}\n"
                f"To use it, mention {bot} in a channel (or DM me) with a picture and the word alone, e.g. "
                f"{bot} {word}, or `!{word}` followed by words to add to the prompt. In a thread that "
                "already has a picture it works without a new one."
            )
        intro = "" if word == "help" else f"I don't know `{no_fence(word)}`.\n"
        return intro + escape_mrkdwn(self.core.help_text()) + "\n\n" + self._slack_help(bot, presets)

    def _slack_help(self, bot: str, presets: dict[str, str]) -> str:
        """What only Slack adds to the core's help: where to ask, and the slash command."""
        command = self.settings.slash_command
        listed = "\n".join(f"   • `{name}` — {no_fence(prompt)}" for name, prompt in presets.items())
        return (
            "*In Slack*\n"
            f"• In a channel, mention {bot} with a picture and a question: I answer in a thread, where "
            "follow-ups need no mention.\n"
            "• In a DM, just send a picture and a question.\n"
            f"• `{command} settings` shows the model and your limits; `{command}` and a preset name explains "
            f"the preset. The presets:\n{listed}"
        )
