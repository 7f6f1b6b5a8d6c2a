"""Shared pieces of the OpenAI-compatible API tests (imported as ``openai_helpers``: pytest puts this folder
on sys.path): a real BotService on SQLite behind the real aiohttp server on loopback, an API key made the
way ``admin keys create`` makes it, and the real ``openai`` client pointed at it."""

from __future__ import annotations

import base64
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from openai import AsyncOpenAI

from adapters.openai_api import OpenAISettings, create_app
from bot.core.config import Settings
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests import pictures


def png(color: tuple[int, int, int] = (200, 40, 0), size: tuple[int, int] = (64, 48)) -> bytes:
    return pictures.png(color, size)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(text: str, *urls: str) -> dict[str, Any]:
    """A user message in the SDK's shape: text then ``image_url`` parts (as Open WebUI and llmcord send)."""
    if not urls:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": u, "detail": "auto"}} for u in urls]
    return {"role": "user", "content": parts}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


@dataclass
class Api:
    """A running API: ``client()`` is the real SDK with the key (no retries unless asked), ``url`` its base."""

    url: str
    key: str
    service: BotService
    db: Database
    backend: Any
    clients: list[AsyncOpenAI] = field(default_factory=list)

    def client(self, key: str | None = None, **kwargs: Any) -> AsyncOpenAI:
        """The SDK with ``key`` (default: alice's), closed with the server (on this event loop)."""
        kwargs.setdefault("max_retries", 0)
        made = AsyncOpenAI(base_url=self.url, api_key=key if key is not None else self.key, **kwargs)
        self.clients.append(made)
        return made

    async def new_key(self, user: str, workspace: str = "default") -> str:
        return (await self.db.create_api_key("openai", workspace, user))[1]


@contextlib.asynccontextmanager
async def running_api(
    folder: Path, backend: Any, settings: dict[str, Any] | None = None, openai: dict[str, Any] | None = None,
    **app_kwargs: Any,
) -> AsyncIterator[Api]:  # fmt: skip
    """A fresh SQLite database, the core and the API server on 127.0.0.1 (a free port) on this event loop."""
    db = Database(sqlite_url(folder / f"api-{uuid.uuid4().hex[:8]}.db"))
    await db.create_all()
    base = {"generation": {"max_new_tokens": 6, "do_sample": False}, "render": {"enabled": False}}
    for section, values in (settings or {}).items():
        base.setdefault(section, {}).update(values)
    service = BotService(Settings.model_validate(base), db, backend)
    config = OpenAISettings(enabled=True, port=0, **(openai or {}))
    runner = web.AppRunner(create_app(service, config, **app_kwargs), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    _row, key = await db.create_api_key("openai", "acme", "alice")
    api = Api(f"http://127.0.0.1:{port}/v1", key, service, db, backend)
    try:
        yield api
    finally:
        for client in api.clients:
            await client.close()
        await runner.cleanup()
        await service.close()
        await db.dispose()
