"""The core with MiniGPT-v2's tasks: presets in help and settings, the prompts sent, and any answer with boxes
coming back with the thread's latest picture annotated — from the scripted backend and from a backend written
outside the project, installed through the ``minigpt4_bot.backends`` entry point (issue 24)."""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.core import plugins
from bot.core.config import Settings
from bot.core.requests import Final, ImageAttachment, Request
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests import pictures
from tests.scripted_backend import ScriptedBackend

BOXES = "There is <p>a red square</p> {<10><20><40><60>} on <p>the floor</p> {<0><70><100><100>}."
V2 = {"model": {"variant": "minigptv2"}}


def png(color: tuple[int, int, int], size: tuple[int, int] = (200, 100)) -> bytes:
    return pictures.png(color, size)


def ask(text: str, *images: bytes, thread: str = "t1") -> Request:
    return Request("kiosk", "W", "C", thread, "alice", text, tuple(ImageAttachment(i) for i in images))


async def _replies(service: BotService, request: Request) -> list[Final]:
    return [e async for e in service.handle(request) if isinstance(e, Final)]


def run(tmp_path: Path, settings: dict[str, Any], backend: Any, body: Any) -> None:
    async def main() -> None:
        db = Database(sqlite_url(tmp_path / "grounding.db"))
        await db.create_all()
        service = BotService(Settings.model_validate(settings), db, backend)
        try:
            await body(service)
        finally:
            await service.close()
            await db.dispose()

    asyncio.run(main())


def test_grounding_help_and_settings_list_the_tasks_with_minigptv2_only(tmp_path: Path) -> None:
    async def body(service: BotService) -> None:
        (help_reply,) = await _replies(service, ask("help"))
        (settings_reply,) = await _replies(service, ask("settings"))
        for name in ("grounding", "refer", "detection", "identify", "vqa", "caption"):
            assert name in help_reply.text and name in settings_reply.text
        assert "identify 10 20 60 80" in help_reply.text
        assert "identify" in [p.name for p in service.presets()]  # the web menu and Discord's option list

    run(tmp_path, V2, ScriptedBackend(), body)

    async def plain(service: BotService) -> None:
        (help_reply,) = await _replies(service, ask("help"))
        assert "grounding" not in help_reply.text and "identify" not in help_reply.text

    run(tmp_path / "v1", {}, ScriptedBackend(), plain)


def test_grounding_task_prompts_reach_the_backend_and_bad_regions_do_not(tmp_path: Path) -> None:
    backend = ScriptedBackend("A chicken nugget.")

    async def body(service: BotService) -> None:
        await _replies(service, ask("/refer the world cup", png((9, 9, 9))))
        await _replies(service, ask("identify 4 50 31 66"))
        await _replies(service, ask("grounding"))
        sent = [call["turns"][-1]["text"] for call in backend.calls]
        assert sent == ["[refer] the world cup", "[identify] what is this {<4><50><30><65>}",
                        "[grounding] describe this image in detail"]  # fmt: skip
        for bad, says in (("identify 10 20 160 80", "got 160"), ("refer", "/refer the red car")):
            (reply,) = await _replies(service, ask(bad))
            assert reply.kind == "notice" and says in reply.text
        assert len(backend.calls) == 3  # nothing asked, nothing charged

    run(tmp_path, V2, backend, body)


def test_grounding_boxes_are_drawn_on_the_latest_picture(tmp_path: Path) -> None:
    backend = ScriptedBackend("A small picture.")
    backend.script = ["Two squares.", BOXES]

    async def body(service: BotService) -> None:
        (first,) = await _replies(service, ask("What is this?", png((0, 0, 200), (100, 100))))
        assert first.files == () and first.text == "Two squares."
        (answer,) = await _replies(service, ask("grounding", png((250, 250, 250), (200, 100))))
        assert answer.kind == "answer"
        assert answer.text == "There is **a red square** on **the floor**."
        (file,) = answer.files
        assert (file.filename, file.mime, file.is_image) == ("boxes.png", "image/png", True)
        image = Image.open(io.BytesIO(file.data)).convert("RGB")
        assert image.size == (800, 400)  # the second picture (2:1), long side [grounding] long_side
        assert image.getpixel((400, 200)) == (250, 250, 250)  # its background, not the first picture's blue
        assert image.getpixel((80, 200)) == (255, 0, 0)  # the left edge of "a red square": 10 % of 800
        assert answer.meta["boxes"] == 2

    run(tmp_path, {}, backend, body)  # whatever the variant: any answer with boxes


def test_grounding_answers_without_boxes_and_grounding_off_are_as_written(tmp_path: Path) -> None:
    async def body(service: BotService) -> None:
        (answer,) = await _replies(service, ask("What is it?", png((1, 2, 3))))
        assert answer.files == () and answer.text == BOXES  # [grounding] enabled = false

    run(tmp_path, {"grounding": {"enabled": False}}, ScriptedBackend(BOXES), body)

    async def no_boxes(service: BotService) -> None:
        (answer,) = await _replies(service, ask("What is it?", png((1, 2, 3))))
        assert answer.files == () and answer.text == "A red circle."

    run(tmp_path / "plain", {}, ScriptedBackend(), no_boxes)


OUT_OF_TREE = '''
"""A backend of someone else's: answers every question with boxes, as MiniGPT-v2 served elsewhere would."""
from bot.core.backend_api import BackendPlugin
from model.engine.contract import FinalEvent, TokenEvent

ANSWER = "<p>a boat</p> {<20><30><60><70>}"


class BoxesBackend:
    async def stream(self, *, turns, images, conversation_id, user, options):
        yield TokenEvent("r", 0, 0, ANSWER)
        yield FinalEvent("r", "eos", ANSWER, (1,), 10, 1, 0, 0.0, 0.01, 0.02)

    def describe(self):
        return {"variant": "minigptv2", "device": "remote", "dtype": "?", "demo": False}

    def stats(self):
        return {"queue_depth": 0, "batch_size": 0}

    async def close(self):
        pass


async def _create(settings, **overrides):
    return BoxesBackend()


BOXES_BACKEND = BackendPlugin("harbour", _create)
'''


@pytest.fixture
def harbour_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``harbour``: a backend package installed as a real distribution with an entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "harbour_backend.py").write_text(OUT_OF_TREE)
    info = site / "harbour_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: harbour-backend\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[minigpt4_bot.backends]\nharbour = harbour_backend:BOXES_BACKEND\n")
    monkeypatch.syspath_prepend(str(site))
    caches = (plugins.plugin_names, plugins.load_plugin)
    for cached in caches:
        cached.cache_clear()
    yield
    monkeypatch.undo()
    for cached in caches:
        cached.cache_clear()
    sys.modules.pop("harbour_backend", None)


def test_grounding_an_out_of_tree_backend_gets_its_boxes_drawn(tmp_path: Path, harbour_backend: Any) -> None:
    async def main() -> None:
        settings = Settings.model_validate({"engine": {"backend": "harbour"}, **V2})
        backend = await plugins.load_plugin(plugins.BACKENDS, "harbour").start(settings)
        db = Database(sqlite_url(tmp_path / "harbour.db"))
        await db.create_all()
        service = BotService(settings, db, backend)
        try:
            (answer,) = await _replies(service, ask("/detection boats", png((0, 90, 160), (300, 150))))
        finally:
            await service.close()
            await db.dispose()
        assert answer.text == "**a boat**"
        (file,) = answer.files
        image = Image.open(io.BytesIO(file.data)).convert("RGB")
        assert image.size == (800, 400) and image.getpixel((160, 200)) == (255, 0, 0)  # left edge at 20 %
        assert image.getpixel((400, 200)) == (0, 90, 160)

    asyncio.run(main())
