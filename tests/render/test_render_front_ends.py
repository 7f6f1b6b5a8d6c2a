"""Website previews as the web chat and the terminal show them (Slack: tests/slack/test_slack_uploads.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from rich.console import Console

from adapters.terminal import TerminalChat
from adapters.web import create_app
from bot.core.config import Settings
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests.pictures import png
from tests.scripted_backend import ScriptedBackend

PAGE = (
    "<!doctype html><html><body style='margin:0'>"
    "<div style='width:120px;height:80px;background:#f00'></div></body></html>"
)
ANSWER = "```html\n" + PAGE + "\n```"


def _picture() -> bytes:
    return png((10, 200, 10), (24, 24))


async def _service(tmp_path: Path) -> tuple[BotService, Database]:
    db = Database(sqlite_url(tmp_path / "front.db"))
    await db.create_all()
    return BotService(Settings(), db, ScriptedBackend(ANSWER, piece=30)), db


def test_render_web_final_event_carries_preview_and_page(tmp_path: Path) -> None:
    async def main() -> list[dict[str, Any]]:
        service, db = await _service(tmp_path)
        client = TestClient(TestServer(create_app(service)))
        await client.start_server()
        try:
            form = aiohttp.FormData(default_to_multipart=True)
            for name, value in (("thread", "t-site"), ("text", "website"), ("user", "u"), ("event_id", "e1")):
                form.add_field(name, value)
            form.add_field("image", _picture(), filename="sketch.png", content_type="image/png")
            response = await client.post("/api/messages", data=form)
            body = await response.text()
        finally:
            await client.close()
            await service.close()
            await db.dispose()
        finals = [json.loads(block.split("data: ", 1)[1]) for block in body.split("\n\n") if "event: final" in block]
        return finals[0]["files"]

    files = asyncio.run(main())
    # the page goes as a download type: a blob of the bot's origin must never open as text/html
    assert [(f["filename"], f["mime"]) for f in files] == [
        ("website.png", "image/png"), ("website.html", "application/octet-stream"),
    ]  # fmt: skip
    preview = Image.open(io.BytesIO(base64.b64decode(files[0]["data"]))).convert("RGB")
    assert preview.getpixel((60, 40)) == (255, 0, 0)
    assert base64.b64decode(files[1]["data"]).decode() == PAGE


def test_render_terminal_saves_both_files_and_prints_their_paths(tmp_path: Path) -> None:
    sketch = tmp_path / "sketch.png"
    sketch.write_bytes(_picture())
    lines = iter([f"/image {sketch} website"])

    def read_line(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    async def main() -> str:
        service, db = await _service(tmp_path)
        buffer = io.StringIO()
        chat = TerminalChat(service.handle, Console(file=buffer, width=300), read_line, user="tester",
                            files_dir=tmp_path / "files")  # fmt: skip
        try:
            await chat.run()
        finally:
            await service.close()
            await db.dispose()
        return buffer.getvalue()

    output = asyncio.run(main())
    saved = sorted((tmp_path / "files").rglob("*"))
    files = [p for p in saved if p.is_file()]
    assert sorted(p.name.split("-", 1)[1] for p in files) == ["website.html", "website.png"]
    for path in files:
        assert str(path) in output  # each path printed
    html = next(p for p in files if p.suffix == ".html")
    assert html.read_text() == PAGE
