"""Website previews as the web chat and the terminal show them (Slack: tests/slack/test_slack_uploads.py)."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console

from bot.core.config import Settings
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests.front_end_helpers import final_event, terminal_chat, web_chat, web_form
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
        async with web_chat(service, db) as client:
            form = web_form("t-site", "website", "e1", _picture(), "sketch.png", user="u")
            response = await client.post("/api/messages", data=form)
            return final_event(await response.text())["files"]

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

    async def main() -> str:
        service, db = await _service(tmp_path)
        buffer = io.StringIO()
        console = Console(file=buffer, width=300)
        await terminal_chat(service, db, console, tmp_path / "files", f"/image {sketch} website")
        return buffer.getvalue()

    output = asyncio.run(main())
    saved = sorted((tmp_path / "files").rglob("*"))
    files = [p for p in saved if p.is_file()]
    assert sorted(p.name.split("-", 1)[1] for p in files) == ["website.html", "website.png"]
    for path in files:
        assert str(path) in output  # each path printed
    html = next(p for p in files if p.suffix == ".html")
    assert html.read_text() == PAGE
