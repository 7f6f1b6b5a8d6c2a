"""Shared pieces of the Discord tests (imported as ``discord_helpers``: pytest puts this folder on sys.path).

``discord_env`` wires a fresh SQLite database, a real :class:`BotService` on the scripted backend, the fake
Discord (discord.py pointed at it, and restored afterwards) and a started Discord front end built through its
entry-point plugin, ``adapters.discord.FRONT_END``.  ``Env.restart`` replaces the front end and the core (same
database, same fake Discord), as a restarted bot process would.  Start, stop and restart are the scaffolding
every chat platform's tests share: ``tests/chat_helpers.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fake_discord import FakeDiscord, Message

from adapters.discord import FRONT_END, DiscordSettings
from adapters.discord.app import DiscordFrontEnd
from bot.core.config import Settings
from bot.core.frontend_api import FrontEndContext, ThreadTurn
from bot.core.requests import ThreadRef
from bot.core.service import BotService
from tests import chat_helpers
from tests.chat_helpers import ChatEnv, fresh_database, run_in
from tests.pictures import png as png_bytes
from tests.scripted_backend import ScriptedBackend

__all__ = ["Env", "FakeDiscord", "Message", "ScriptedBackend", "discord_env", "in_discord", "png_bytes"]

BASE: dict[str, Any] = {
    **chat_helpers.BASE,
    "render": {"enabled": False},  # no Chromium: a test that wants previews passes a renderer
}


def make_settings(**sections: dict[str, Any]) -> Settings:
    return chat_helpers.make_settings(BASE, **sections)


class Env(ChatEnv):
    """The fake Discord, the database file, and the running core (``service``) and front end (``adapter``)."""

    platform = "discord"
    adapter: DiscordFrontEnd | None

    def __init__(
        self, fake: FakeDiscord, url: str, settings: Settings, discord: DiscordSettings, backend: Any, renderer: Any
    ) -> None:
        super().__init__(url, settings, backend, renderer)
        self.fake, self.discord = fake, discord

    @property
    def guild(self) -> str:
        return str(self.fake.guild_id)

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

    def front_end(self, service: BotService) -> DiscordFrontEnd:
        """The Discord front end built by the entry-point plugin, with the fake's token."""
        adapter = FRONT_END.create(service, self.discord, FrontEndContext())
        assert isinstance(adapter, DiscordFrontEnd)
        adapter.environ = {"DISCORD_BOT_TOKEN": self.fake.token}
        return adapter


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
    url = await fresh_database(folder, "discord")
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


def in_discord(main: Callable[[Env, FakeDiscord], Awaitable[None]], folder: Path, **env: Any) -> None:
    """:func:`~tests.chat_helpers.run_in` :func:`discord_env`: ``main(env, fake)`` in a started Discord env."""
    run_in(discord_env, main, folder, **env)
