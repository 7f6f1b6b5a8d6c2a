"""Shared pieces of the Discord tests (imported as ``discord_helpers``: pytest puts this folder on sys.path).

``discord_env`` wires a fresh SQLite database, a real :class:`BotService` on the scripted backend, the fake
Discord (discord.py pointed at it, and restored afterwards) and a started Discord front end built through its
entry-point plugin, ``adapters.discord.FRONT_END``.  ``Env.restart`` replaces the front end and the core (same
database, same fake Discord), as a restarted bot process would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fake_discord import FakeDiscord, Message
from PIL import Image

from adapters.discord import FRONT_END, DiscordSettings
from adapters.discord.app import DiscordFrontEnd
from bot.core.config import Settings
from bot.core.frontend_api import Core, FrontEnd, FrontEndContext, ThreadTurn
from bot.core.requests import ThreadRef
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests.scripted_backend import ScriptedBackend

__all__ = ["Env", "FakeDiscord", "Message", "ScriptedBackend", "discord_env", "png_bytes"]

BASE: dict[str, Any] = {
    "generation": {"max_new_tokens": 8, "do_sample": False},
    "images": {"max_bytes": 512 * 1024, "max_per_message": 2},
    "render": {"enabled": False},  # no Chromium: a test that wants previews passes a renderer
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


class Env:
    """The fake Discord, the database file, and the running core (``service``) and front end (``adapter``)."""

    def __init__(
        self, fake: FakeDiscord, url: str, settings: Settings, discord: DiscordSettings, backend: Any, renderer: Any
    ) -> None:
        self.fake, self.url, self.settings, self.discord, self.backend = fake, url, settings, discord, backend
        self.renderer = renderer
        self.db: Database | None = None
        self.service: BotService | None = None
        self.adapter: DiscordFrontEnd | None = None

    @property
    def guild(self) -> str:
        return str(self.fake.guild_id)

    def outcomes(self) -> dict[str, float]:
        """``minigpt4_requests_total{platform="discord"}`` by outcome, from the core's /metrics text."""
        found: dict[str, float] = {}
        for line in self.service.metrics_text().decode().splitlines():
            if line.startswith("minigpt4_requests_total{") and 'platform="discord"' in line:
                outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
                found[outcome] = float(line.rsplit(" ", 1)[1])
        return found

    async def turns(self, thread: int | str, channel: int | str | None = None, workspace: str | None = None) -> list:
        channel = self.fake.general if channel is None else channel
        ref = ThreadRef("discord", workspace or self.guild, str(channel), str(thread))
        return list((await self.service.thread(ref, turns=True)).turns)

    async def answered(
        self, thread: int | str, answers: int = 1, *, channel: int | str | None = None, workspace: str | None = None,
        shown_in: int | None = None, timeout: float = 20.0,
    ) -> list[ThreadTurn]:  # fmt: skip
        """Wait until ``answers`` answers are stored as done and the last bot message in ``shown_in`` ends the last."""
        deadline = time.monotonic() + timeout
        while True:
            turns = await self.turns(thread, channel, workspace)
            done = [t for t in turns if t.role == "assistant" and t.status == "done"]
            shown = self.fake.bot_messages(shown_in) if shown_in is not None else []
            if len(done) >= answers and (shown_in is None or (shown and done[-1].text.endswith(shown[-1].content))):
                return turns
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer in {thread}: {[(t.role, t.status) for t in turns]} "
                                     f"{[m.content for m in shown]}")  # fmt: skip
            await asyncio.sleep(0.05)

    async def start(self) -> None:
        self.db = Database(self.url)
        self.service = BotService(self.settings, self.db, self.backend, renderer=self.renderer)
        assert isinstance(self.service, Core)
        adapter = FRONT_END.create(self.service, self.discord, FrontEndContext())
        assert isinstance(adapter, DiscordFrontEnd) and isinstance(adapter, FrontEnd) and adapter.name == "discord"
        adapter.environ = {"DISCORD_BOT_TOKEN": self.fake.token}
        self.adapter = adapter
        await adapter.start()

    async def stop(self) -> None:
        if self.adapter is not None:
            await self.adapter.stop()
        if self.service is not None:
            await self.service.close()
        if self.db is not None:
            await self.db.dispose()
        self.adapter = self.service = self.db = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()


@contextlib.asynccontextmanager
async def discord_env(
    folder: Path,
    *,
    backend: Any = None,
    discord: dict[str, Any] | None = None,
    fake: FakeDiscord | None = None,
    renderer: Any = None,
    update_interval_s: float = 0.05,
    **sections: dict[str, Any],
) -> AsyncIterator[Env]:
    fake = await (fake or FakeDiscord()).start()
    url = sqlite_url(folder / f"discord-{uuid.uuid4().hex[:8]}.db")
    schema = Database(url)
    await schema.create_all()
    await schema.dispose()
    settings = DiscordSettings.model_validate({"enabled": True} | (discord or {}))
    if "update_interval_s" not in (discord or {}):  # faster than [discord] allows (≥ 1 s), for quick tests
        settings = settings.model_copy(update={"update_interval_s": update_interval_s})
    env = Env(fake, url, make_settings(**sections), settings, backend or ScriptedBackend("A red square."), renderer)
    try:
        async with fake.routed():  # stopped inside: interrupted answers are edited through the fake too
            try:
                await env.start()
                yield env
                # Every message the bot edited kept update_interval_s between versions, the final one included
                # (arrival times at the fake: a little under the interval is the network's doing).
                assert fake.fast_edits(settings.update_interval_s * 0.9) == []
            finally:
                await env.stop()
    finally:
        await fake.close()
