"""The terminal front end through the real bot core, storage and engine (demo weights, SQLite)."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image
from rich.console import Console

from adapters.terminal import TerminalChat
from bot.core.config import Settings
from bot.core.requests import Final
from bot.core.service import BotService
from model.engine import Engine
from model.engine.local_backend import EngineBackend
from storage import Database, sqlite_url
from tests.front_end_helpers import typed_lines


def _chat(demo_models, tmp_path, lines: list[str]) -> tuple[str, list]:
    settings = Settings.model_validate({"generation": {"max_new_tokens": 4, "do_sample": False}})

    async def main():
        db = Database(sqlite_url(tmp_path / "bot.db"))
        await db.create_all()
        buffer = io.StringIO()
        async with Engine(demo_models["vicuna0"]) as engine:
            service = BotService(settings, db, EngineBackend(engine))
            chat = TerminalChat(service.handle, Console(file=buffer, width=200), typed_lines(lines), user="tester")
            await chat.run()
            conversations = await db.list_conversations(platform="terminal")
            turns = [await db.turns(c.id) for c, _ in conversations]
        await db.dispose()
        return buffer.getvalue(), turns

    return asyncio.run(main())


@pytest.fixture
def pictures(tmp_path):
    first, second = tmp_path / "dish.png", tmp_path / "second.jpg"
    Image.new("RGB", (64, 48), (250, 120, 0)).save(first)
    Image.new("RGB", (30, 60), (0, 0, 200)).save(second)
    return first, second


def test_image_question_follow_up_and_reset(demo_models, tmp_path, pictures):
    first, second = pictures
    output, threads = _chat(
        demo_models,
        tmp_path,
        [
            "what is this?",  # no picture yet
            f"/image {first} What can I cook with this?",
            "And for dessert?",
            f"/image {second}",
            "Compare both pictures.",
            "/reset",
        ],
    )
    assert "I need a picture" in output
    assert "Attached second.jpg" in output
    assert output.count("bot> ") == 3
    assert "Starting over" in output
    (turns,) = threads
    assert [t.role for t in turns] == ["user", "assistant"] * 3
    assert [t.status for t in turns if t.role == "assistant"] == ["done"] * 3
    assert sum(1 for t in turns if t.image_id) == 2
    assert turns[4].text == "Compare both pictures."


def test_bad_files_keep_the_chat_alive(demo_models, tmp_path):
    html = tmp_path / "page.png"
    html.write_bytes(b"<html><body>login</body></html>")
    truncated = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.new("RGB", (50, 50), (1, 2, 3)).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:60])
    good = tmp_path / "ok.png"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(good)
    output, threads = _chat(
        demo_models,
        tmp_path,
        [f"/image {html} hi", f"/image {truncated} hi", f"/image {tmp_path / 'missing.png'}", "/bogus",
         f"/image {good} hi"],
    )  # fmt: skip
    assert "page.png arrived as a web page" in output
    assert "cut.png seems truncated or corrupt" in output
    assert "No such file" in output
    assert "Unknown command '/bogus'" in output
    assert output.count("bot> ") == 1
    (turns,) = threads
    assert [t.role for t in turns] == ["user", "assistant"]


def test_a_log_line_while_the_prompt_waits_clears_the_line_and_redraws_the_prompt():
    """The log shares the chat's terminal: a record is printed on a line of its own, then the prompt again."""
    import logging

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=200)
    prompts = iter(["/quit"])

    def read_line(prompt: str) -> str:  # what input() does: the prompt, the user typing, then a log record
        screen.write(prompt + "hel")
        logging.getLogger("adapters.web").warning("a log line")
        return next(prompts)

    async def no_answers(_request):
        yield Final("unused")

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [logging.StreamHandler(screen)]
    try:
        asyncio.run(TerminalChat(no_answers, console, read_line, user="u", log_on_screen=True).run())
    finally:
        root.handlers = saved
    assert "you> hel\r\x1b[2Ka log line\nyou> " in screen.getvalue()


def test_help_names_the_formats_the_core_reads(tmp_path):
    """``/help`` lists the core's picture formats (``Core.image_limits``), not a list of its own that left out
    BMP and HEIC (issue 26, item 11)."""
    from adapters.terminal import TerminalFrontEnd
    from bot.core.frontend_api import FrontEndContext
    from tests.scripted_backend import ScriptedBackend

    async def main() -> tuple[str, str]:
        db = Database(sqlite_url(tmp_path / "bot.db"))
        service = BotService(Settings(), db, ScriptedBackend())
        front_end = TerminalFrontEnd(service, FrontEndContext(data_dir=tmp_path))
        buffer = io.StringIO()
        front_end.chat.console = Console(file=buffer, width=200)
        await front_end.chat.on_line("/help")
        await db.dispose()
        return buffer.getvalue(), service.image_limits.formats_text()

    shown, formats = asyncio.run(main())
    assert f"attach a picture ({formats});" in shown and "BMP" in formats
