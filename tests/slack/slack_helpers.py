"""Shared pieces of the Slack tests (imported as ``slack_helpers``: pytest puts this folder on sys.path).

``slack_env`` wires a fresh SQLite database, a real :class:`BotService` as the core (on the shared
demo-weights engine or a scripted backend), the fake Slack and a started Slack front end — built through
its entry-point plugin, ``adapters.slack.FRONT_END`` — whose every Web API call goes to the fake through
``[slack] api_url``.  ``Env.restart`` replaces the front end and the core (same database, same fake
Slack), as a restarted bot process would.  Start, stop (the core closed too) and restart are the
scaffolding every chat platform's tests share: ``tests/chat_helpers.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fake_slack import FakeSlack

from adapters.slack import FRONT_END, SlackSettings
from adapters.slack.app import EVENTS_PATH, SlackFrontEnd
from adapters.slack.messages import escape_mrkdwn
from bot.core.config import Settings
from bot.core.frontend_api import FrontEndContext, ThreadTurn
from bot.core.requests import ThreadRef
from bot.core.service import BotService
from tests.chat_helpers import ChatEnv, fresh_database, run_in
from tests.chat_helpers import make_settings as _make_settings
from tests.pictures import png as png_bytes
from tests.scripted_backend import ScriptedBackend

__all__ = ["CHANNEL", "Env", "FakeSlack", "ScriptedBackend", "in_slack", "make_settings", "png_bytes", "slack_env"]

CHANNEL = "C0GENERAL"


def make_settings(**sections: dict[str, Any]) -> Settings:
    return _make_settings(**sections)


def slack_settings(fake: FakeSlack, mode: str, **values: Any) -> SlackSettings:
    """``[slack]`` pointing at the fake; edits unthrottled unless a test sets its own budget."""
    defaults = {"api_url": fake.api_url, "mode": mode, "http_port": 0, "update_interval_s": 0.0,
                "updates_per_minute": 600}  # fmt: skip
    return SlackSettings.model_validate(defaults | values)


class Env(ChatEnv):
    """The fake Slack, the database file, and the running core (``service``) and front end (``adapter``)."""

    platform = "slack"
    adapter: SlackFrontEnd | None

    def __init__(self, fake: FakeSlack, url: str, settings: Settings, slack: SlackSettings, backend: Any,
                 clock: Callable[[], float], sleep: Callable[[float], Any]) -> None:  # fmt: skip
        super().__init__(url, settings, backend)
        self.fake, self.slack, self.clock, self.sleep = fake, slack, clock, sleep
        self._socket: Any = None

    @property
    def events_url(self) -> str:
        return f"http://127.0.0.1:{self.adapter.http_port}{EVENTS_PATH}"

    async def turns(self, thread: str, channel: str = CHANNEL) -> list[ThreadTurn]:
        """The turns of the thread's live conversation, as the core shows them."""
        view = await self.service.thread(ThreadRef("slack", self.fake.team, channel, thread), turns=True)
        return list(view.turns)

    async def answered(self, thread: str, answers: int = 1, channel: str = CHANNEL, timeout: float = 30.0) -> list:
        """Wait until ``answers`` answers are stored as done and the thread's last bot message shows the last one."""
        deadline = time.monotonic() + timeout
        while True:
            turns = await self.turns(thread, channel)
            done = [t for t in turns if t.role == "assistant" and t.status == "done"]
            replies = self.fake.bot_replies(channel, thread)
            if len(done) >= answers and replies and replies[-1].text == escape_mrkdwn(done[-1].text):
                return turns
            if time.monotonic() > deadline:
                shown = [m.text for m in replies]
                raise AssertionError(f"no answer in {thread}: turns={[(t.role, t.status) for t in turns]} {shown}")
            await asyncio.sleep(0.05)

    def front_end(self, service: BotService) -> SlackFrontEnd:
        """The Slack front end built by the entry-point plugin, every Web API call going to the fake."""
        adapter = FRONT_END.create(service, self.slack, FrontEndContext())
        assert isinstance(adapter, SlackFrontEnd)
        adapter.environ = {"SLACK_BOT_TOKEN": self.fake.bot_token, "SLACK_APP_TOKEN": self.fake.app_token,
                           "SLACK_SIGNING_SECRET": self.fake.signing_secret}  # fmt: skip
        adapter.clock, adapter.sleep = self.clock, self.sleep
        self._socket = self.fake._ws
        return adapter

    async def started(self) -> None:
        if self.slack.mode == "socket":  # wait for this front end's own websocket
            await self.fake.wait_for(lambda: self.fake._ws is not None and self.fake._ws is not self._socket)


@contextlib.asynccontextmanager
async def slack_env(
    folder: Path,
    *,
    backend: Any,
    mode: str = "socket",
    slack: dict[str, Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Any] = asyncio.sleep,
    **sections: dict[str, Any],
) -> AsyncIterator[Env]:
    fake = await FakeSlack(clock=clock).start()
    url = await fresh_database(folder, "slack")
    env = Env(fake, url, make_settings(**sections), slack_settings(fake, mode, **(slack or {})), backend, clock, sleep)
    try:
        await env.start()
        yield env
    finally:
        await env.stop()
        await fake.close()


def in_slack(main: Callable[[Env, FakeSlack], Awaitable[None]], folder: Path, **env: Any) -> None:
    """:func:`~tests.chat_helpers.run_in` :func:`slack_env`: ``main(env, fake)`` in a started Slack env."""
    run_in(slack_env, main, folder, **env)
