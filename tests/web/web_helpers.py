"""Shared pieces of the web front-end tests (imported as ``web_helpers``: pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from adapters.web import run_web
from bot.core.backend_api import GenerationBackend
from bot.core.config import Settings
from bot.core.service import BotService
from model import load_minigpt4
from model.demo_weights import write_demo_weights
from model.engine import Engine
from storage import Database, sqlite_url
from tests.pictures import png

# Small answers, greedy (deterministic), small image limits so the upload limit is cheap to exceed.
BASE_SETTINGS: dict[str, Any] = {
    "generation": {"max_new_tokens": 6, "do_sample": False},
    "images": {"max_bytes": 256 * 1024, "max_per_message": 2, "max_pixels": 4_000_000},
}


def make_settings(**overrides: Any) -> Settings:
    data = json.loads(json.dumps(BASE_SETTINGS))
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return Settings.model_validate(data)


def start_demo_engine(folder: Path) -> Engine:
    """A running engine over tiny random vicuna0 demo weights (the caller stops it)."""
    weights = write_demo_weights(folder, "vicuna0")
    return Engine(load_minigpt4(**weights.loader_kwargs())).start()


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    return png(color, size)


def jpeg_bytes(size: tuple[int, int] = (96, 96)) -> bytes:
    """A JPEG with detail (noise), so cutting it short really truncates the scan data."""
    buffer = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims ``width``×``height`` pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def parse_sse(body: str) -> list[tuple[str, dict[str, Any]]]:
    """``event:``/``data:`` blocks → [(event, json data)], in order."""
    events: list[tuple[str, dict[str, Any]]] = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", []
        for line in block.split("\n"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        events.append((name, json.loads("\n".join(data)) if data else {}))
    return events


class BackgroundWeb:
    """The web front end on its own event loop in a thread (as ``minigpt4-bot serve`` runs it), on SQLite.

    Browser tests drive it from their own loop; :meth:`call` runs a coroutine on the bot's loop.
    """

    def __init__(self, folder: Path, backend: GenerationBackend, settings: Settings, name: str = "web") -> None:
        self.folder, self.backend, self.settings, self.name = folder, backend, settings, name
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"{name}-loop", daemon=True)
        self.port = 0

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.call(self._start())

    async def _start(self) -> None:
        self.db = Database(sqlite_url(self.folder / f"{self.name}.db"))
        await self.db.create_all()
        self.service = BotService(self.settings, self.db, self.backend)
        self.runner = await run_web(self.service, "127.0.0.1", 0)
        self.port = self.runner.addresses[0][1]

    def running(self) -> Iterator[Any]:
        """Start, hand out this bot, stop afterwards: a module-scoped fixture is ``yield from Bot(...).running()``."""
        self.start()
        yield self
        self.stop()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.runner.cleanup())
            self.call(self.db.dispose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
