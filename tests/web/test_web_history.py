"""The history API as a reloaded page needs it (issue 26, items 7 and 13), over real HTTP (``run_web``):
user turns as the user sent them (words, preset by name, the picture's URL), the picture served to that
thread only, and a ``website`` answer's ``.html`` offered as a download type."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from web_helpers import make_settings, parse_sse, png_bytes

from adapters.web import run_web
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests.scripted_backend import ScriptedBackend

PAGE = "```html\n<!doctype html><html><body><h1>Hi</h1><script>alert(1)</script></body></html>\n```"


async def send(http: aiohttp.ClientSession, base: str, thread: str, text: str, preset: str = "",
               picture: bytes | None = None) -> list[tuple[str, dict[str, Any]]]:  # fmt: skip
    data = aiohttp.FormData(default_to_multipart=True)
    for name, value in (("thread", thread), ("text", text), ("preset", preset), ("event_id", uuid.uuid4().hex)):
        data.add_field(name, value)
    if picture is not None:
        data.add_field("image", picture, filename="sketch.png", content_type="image/png")
    response = await http.post(f"{base}/api/messages", data=data)
    assert response.status == 200, await response.text()
    return parse_sse(await response.text())


def test_history_shows_what_the_user_sent_and_serves_its_pictures(tmp_path: Path) -> None:
    picture = png_bytes((40, 120, 200), (30, 20))

    async def main() -> None:
        db = Database(sqlite_url(tmp_path / "history.db"))
        await db.create_all()
        backend = ScriptedBackend("A page.")
        backend.script = [PAGE]
        service = BotService(make_settings(render={"enabled": False}), db, backend)
        runner = await run_web(service, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession() as http:
                final = (await send(http, base, "t-site", "with a blue header", "website", picture))[-1][1]
                assert [(f["filename"], f["mime"]) for f in final["files"]] == [
                    ("website.html", "application/octet-stream")  # never text/html at the bot's origin
                ]
                await send(http, base, "t-site", "/story about the header")
                await send(http, base, "t-site", "make it shorter")
                await send(http, base, "t-other", "", "", png_bytes((1, 2, 3)))
                history = await (await http.get(f"{base}/api/threads/t-site")).json()
                users = [(t["preset"], t["text"], "image" in t) for t in history["turns"] if t["role"] == "user"]
                assert users == [
                    ("website", "with a blue header", True), ("story", "about the header", False),
                    (None, "make it shorter", False),
                ]  # fmt: skip
                first = history["turns"][0]
                shown = await http.get(base + first["image"])
                assert shown.status == 200 and shown.content_type == "image/png"
                assert await shown.read() == picture
                # Only that thread's turns: another thread's path, or a turn that is not a picture, is a 404.
                other = (await (await http.get(f"{base}/api/threads/t-other")).json())["turns"][0]
                assert (await http.get(f"{base}/api/threads/t-site/images/{other['id']}")).status == 404
                answer = history["turns"][1]["id"]
                assert (await http.get(f"{base}/api/threads/t-site/images/{answer}")).status == 404
                assert (await http.get(f"{base}/api/threads/t-site/images/x")).status == 404
                # A bare picture is asked with the default preset: shown as that preset, no prompt text.
                assert (other["preset"], other["text"]) == ("describe", "")
        finally:
            await runner.cleanup()
            await db.dispose()

    asyncio.run(main())
