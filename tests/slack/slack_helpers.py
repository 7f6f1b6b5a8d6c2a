"""Shared pieces of the Slack tests (imported as ``slack_helpers``: pytest puts this folder on sys.path).

``slack_env`` wires a fresh SQLite database, a real :class:`BotService` as the core (on the shared
demo-weights engine or a scripted backend), the fake Slack and a started Slack front end — built through
its entry-point plugin, ``adapters.slack.FRONT_END`` — whose every Web API call goes to the fake through
``[slack] api_url``.  ``Env.restart`` replaces the front end and the core (same database, same fake
Slack), as a restarted bot process would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fake_slack import FakeSlack
from PIL import Image

from adapters.slack import FRONT_END, SlackSettings
from adapters.slack.app import EVENTS_PATH, SlackFrontEnd
from adapters.slack.messages import escape_mrkdwn
from bot.core.config import Settings
from bot.core.frontend_api import Core, FrontEnd, FrontEndContext, ThreadTurn
from bot.core.requests import ThreadRef
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests.scripted_backend import ScriptedBackend

__all__ = ["CHANNEL", "Env", "ScriptedBackend", "make_settings", "png_bytes", "slack_env"]

CHANNEL = "C0GENERAL"
BASE: dict[str, Any] = {
    "generation": {"max_new_tokens": 8, "do_sample": False},
    "images": {"max_bytes": 512 * 1024, "max_per_message": 2},
}


def make_settings(**sections: dict[str, Any]) -> Settings:
    data = json.loads(json.dumps(BASE))
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return Settings.model_validate(data)


def png_bytes(color: tuple[int, int, int] = (200, 60, 20), size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def slack_settings(fake: FakeSlack, mode: str, **values: Any) -> SlackSettings:
    """``[slack]`` pointing at the fake; edits unthrottled unless a test sets its own budget."""
    defaults = {"api_url": fake.api_url, "mode": mode, "http_port": 0, "update_interval_s": 0.0,
                "updates_per_minute": 600}  # fmt: skip
    return SlackSettings.model_validate(defaults | values)


class Env:
    """The fake Slack, the database file, and the running core (``service``) and front end (``adapter``)."""

    def __init__(self, fake: FakeSlack, url: str, settings: Settings, slack: SlackSettings, backend: Any,
                 clock: Callable[[], float], sleep: Callable[[float], Any]) -> None:  # fmt: skip
        self.fake, self.url, self.settings, self.slack, self.backend = fake, url, settings, slack, backend
        self.clock, self.sleep = clock, sleep
        self.db: Database | None = None
        self.service: BotService | None = None
        self.adapter: SlackFrontEnd | None = None

    @property
    def events_url(self) -> str:
        return f"http://127.0.0.1:{self.adapter.http_port}{EVENTS_PATH}"

    def outcomes(self) -> dict[str, float]:
        """``minigpt4_requests_total{platform="slack"}`` by outcome, from the core's /metrics text."""
        found: dict[str, float] = {}
        for line in self.service.metrics_text().decode().splitlines():
            if line.startswith("minigpt4_requests_total{") and 'platform="slack"' in line:
                outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
                found[outcome] = float(line.rsplit(" ", 1)[1])
        return found

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

    async def start(self) -> None:
        """A core on the database file and a Slack front end built by the entry-point plugin, started."""
        self.db = Database(self.url)
        self.service = BotService(self.settings, self.db, self.backend)
        assert isinstance(self.service, Core)
        adapter = FRONT_END.create(self.service, self.slack, FrontEndContext())
        assert isinstance(adapter, SlackFrontEnd) and isinstance(adapter, FrontEnd) and adapter.name == "slack"
        adapter.environ = {"SLACK_BOT_TOKEN": self.fake.bot_token, "SLACK_APP_TOKEN": self.fake.app_token,
                           "SLACK_SIGNING_SECRET": self.fake.signing_secret}  # fmt: skip
        adapter.clock, adapter.sleep = self.clock, self.sleep
        self.adapter, socket = adapter, self.fake._ws
        await adapter.start()
        if self.slack.mode == "socket":  # wait for this front end's own websocket
            await self.fake.wait_for(lambda: self.fake._ws is not None and self.fake._ws is not socket)

    async def stop(self) -> None:
        if self.adapter is not None:
            await self.adapter.stop()
        if self.db is not None:
            await self.db.dispose()
        self.adapter = self.service = self.db = None

    async def restart(self) -> None:
        """Stop the front end and the core, then start new ones on the same database (a restarted bot)."""
        await self.stop()
        await self.start()


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
    url = sqlite_url(folder / f"slack-{uuid.uuid4().hex[:8]}.db")
    schema = Database(url)
    await schema.create_all()
    await schema.dispose()
    env = Env(fake, url, make_settings(**sections), slack_settings(fake, mode, **(slack or {})), backend, clock, sleep)
    try:
        await env.start()
        yield env
    finally:
        await env.stop()
        await fake.close()
