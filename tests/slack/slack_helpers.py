"""Shared pieces of the Slack tests (imported as ``slack_helpers``: pytest puts this folder on sys.path).

``slack_env`` wires a fresh SQLite database, a real :class:`BotService` (on the shared demo-weights
engine or a scripted backend), the fake Slack and a started :class:`SlackAdapter` whose every Web API
call goes to the fake through ``[slack] api_url``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fake_slack import FakeSlack
from PIL import Image

from adapters.slack import EVENTS_PATH, SlackAdapter, SlackTokens
from adapters.slack_format import escape_mrkdwn
from bot.core.config import Settings
from bot.core.service import BotService
from storage import ConversationKey, Database, sqlite_url

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


@dataclass
class _Token:
    text: str


@dataclass
class _Done:
    text: str
    finish_reason: str = "eos"
    prompt_tokens: int = 10
    completion_tokens: int = 0
    ttft_s: float = 0.01


class ScriptedBackend:
    """A ``bot.core.backend.GenerationBackend`` that streams a fixed text in pieces (``delay`` seconds apart)."""

    def __init__(self, text: str, piece: int = 7, delay: float = 0.0) -> None:
        self.text, self.piece, self.delay = text, piece, delay

    async def stream(self, *, turns: Sequence[dict], images: Sequence[bytes], conversation_id: str, user: str,
                     options: dict[str, Any]) -> AsyncIterator[Any]:  # fmt: skip
        for i in range(0, len(self.text), self.piece):
            if self.delay:
                await asyncio.sleep(self.delay)
            yield _Token(self.text[i : i + self.piece])
        yield _Done(self.text, completion_tokens=len(self.text) // 4)

    def describe(self) -> dict[str, Any]:
        return {"variant": "scripted", "device": "cpu", "dtype": "float32"}

    def stats(self) -> dict[str, Any]:
        return {}


@dataclass
class Env:
    fake: FakeSlack
    adapter: SlackAdapter
    service: BotService
    db: Database

    @property
    def events_url(self) -> str:
        return f"http://127.0.0.1:{self.adapter.http_port}{EVENTS_PATH}"

    def outcomes(self) -> dict[str, float]:
        """``minigpt4_requests_total{platform="slack"}`` by outcome, from the service's /metrics text."""
        found: dict[str, float] = {}
        for line in self.service.metrics.render().decode().splitlines():
            if line.startswith("minigpt4_requests_total{") and 'platform="slack"' in line:
                outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
                found[outcome] = float(line.rsplit(" ", 1)[1])
        return found

    async def turns(self, thread: str, channel: str = CHANNEL) -> list[Any]:
        conversation = await self.db.live_conversation(ConversationKey("slack", self.fake.team, channel, thread))
        return [] if conversation is None else await self.db.turns(conversation.id)

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
    settings = make_settings(
        slack={
            "api_url": fake.api_url,
            "mode": mode,
            "http_port": 0,
            "update_interval_s": 0.0,
            "updates_per_minute": 600,  # the budget test sets its own
            **(slack or {}),
        },
        **sections,
    )
    db = Database(sqlite_url(folder / f"slack-{uuid.uuid4().hex[:8]}.db"))
    await db.create_all()
    service = BotService(settings, db, backend)
    tokens = SlackTokens(fake.bot_token, fake.app_token, fake.signing_secret)
    adapter = SlackAdapter(service, tokens, settings.slack, clock=clock, sleep=sleep)
    try:
        await adapter.start()
        if mode == "socket":
            await fake.wait_connected()
        yield Env(fake, adapter, service, db)
    finally:
        await adapter.cleanup()
        await fake.close()
        await db.dispose()
