"""Scaffolding the chat-platform test helpers share (``tests/slack/slack_helpers.py``,
``tests/discord/discord_helpers.py``, the next platform's): the ``bot.toml`` sections every chat test starts
from, a fresh SQLite database file, and the start / stop / restart of a real :class:`BotService` with the
platform's front end built by its entry-point plugin.

A platform's ``Env`` subclasses :class:`ChatEnv` and supplies only ``front_end`` (how its plugin is pointed
at the platform's fake) — stopping is the same for every platform: the front end, then the core
(:meth:`BotService.close`: the preview browser, the worker row), then the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bot.core.config import Settings
from bot.core.frontend_api import Core, FrontEnd
from bot.core.service import BotService
from storage import Database, sqlite_url

__all__ = ["BASE", "ChatEnv", "fresh_database", "make_settings", "run_in"]

BASE: dict[str, Any] = {
    "generation": {"max_new_tokens": 8, "do_sample": False},
    "images": {"max_bytes": 512 * 1024, "max_per_message": 2},
}


def make_settings(base: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Settings:
    """``base`` (default :data:`BASE`) with each section's values laid over it."""
    data = json.loads(json.dumps(BASE if base is None else base))
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return Settings.model_validate(data)


async def fresh_database(folder: Path, prefix: str) -> str:
    """The URL of a new SQLite file in ``folder`` with the schema created."""
    url = sqlite_url(folder / f"{prefix}-{uuid.uuid4().hex[:8]}.db")
    schema = Database(url)
    await schema.create_all()
    await schema.dispose()
    return url


def run_in(
    started: Callable[..., contextlib.AbstractAsyncContextManager[Any]],
    main: Callable[[Any, Any], Awaitable[None]],
    folder: Path,
    **env: Any,
) -> None:
    """Run ``main(env, env.fake)`` inside ``started(folder, **env)`` (a platform's ``slack_env``, ``discord_env``)
    in a fresh event loop: the frame of most chat-platform tests."""

    async def run() -> None:
        async with started(folder, **env) as running:
            await main(running, running.fake)

    asyncio.run(run())


class ChatEnv:
    """The database file and the running core (``service``) and front end (``adapter``) of one platform."""

    platform = ""

    def __init__(self, url: str, settings: Settings, backend: Any, renderer: Any = None) -> None:
        self.url, self.settings, self.backend, self.renderer = url, settings, backend, renderer
        self.db: Database | None = None
        self.service: BotService | None = None
        self.adapter: Any = None

    def outcomes(self) -> dict[str, float]:
        """``minigpt4_requests_total{platform=...}`` by outcome, from the core's /metrics text."""
        found: dict[str, float] = {}
        for line in self.service.metrics_text().decode().splitlines():
            if line.startswith("minigpt4_requests_total{") and f'platform="{self.platform}"' in line:
                outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
                found[outcome] = float(line.rsplit(" ", 1)[1])
        return found

    def front_end(self, service: BotService) -> FrontEnd:
        """The platform's front end on ``service``, built by its plugin and pointed at the fake (not started)."""
        raise NotImplementedError

    async def started(self) -> None:
        """After ``start``: wait until the front end is connected, where the platform needs it."""

    async def start(self) -> None:
        """A core on the database file and the platform's front end, started."""
        self.db = Database(self.url)
        self.service = BotService(self.settings, self.db, self.backend, renderer=self.renderer)
        assert isinstance(self.service, Core)
        adapter = self.front_end(self.service)
        assert isinstance(adapter, FrontEnd) and adapter.name == self.platform
        self.adapter = adapter
        await adapter.start()
        await self.started()

    async def stop(self) -> None:
        """The front end, then the core, then the database: what a stopping bot process does."""
        if self.adapter is not None:
            await self.adapter.stop()
        if self.service is not None:
            await self.service.close()
        if self.db is not None:
            await self.db.dispose()
        self.adapter = self.service = self.db = None

    async def restart(self) -> None:
        """Stop the front end and the core, then start new ones on the same database (a restarted bot)."""
        await self.stop()
        await self.start()
