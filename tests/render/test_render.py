"""Website previews: HTML found in answers, rendered by a real headless Chromium in its sandbox, sent as files.

The browser is the system Chromium that ``scripts/setup.sh --dev`` installs; the hostile pages point at
a server on loopback that counts every request it gets, so "no network" is measured, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from bot.core.config import RenderSettings, Settings
from bot.core.previews import REPAIRED_NOTE
from bot.core.requests import Final, ImageAttachment, Request
from bot.core.screenshot import ChromiumRenderer, RenderError, chromium_args, find_chromium
from bot.core.service import BotService
from bot.core.website import extract_html
from storage import Database, sqlite_url
from tests.scripted_backend import ScriptedBackend

PAGE = """<!doctype html><html><head><style>body{margin:0;background:#ffffff}</style></head><body>
<div style="position:absolute;left:100px;top:50px;width:300px;height:200px;background:#00aa00"></div>
</body></html>"""


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.fail("Chromium is not installed: scripts/setup.sh --dev installs it (apt-get install chromium)")
    return path


@pytest.fixture
def bait() -> Any:
    """A loopback server that records every request a page manages to send."""
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=b"x", content_type="image/png")

    class Bait:
        async def __aenter__(self) -> Any:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", record)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
            self.hits = hits
            return self

        async def __aexit__(self, *exc: Any) -> None:
            await self.runner.cleanup()

    return Bait()


async def _render(html: str, **settings: Any) -> bytes:
    renderer = ChromiumRenderer(RenderSettings(**settings))
    try:
        return await renderer.render(html)
    finally:
        await renderer.close()


# ----------------------------------------------------------------------------- extraction


def test_render_extracts_fenced_bare_and_cut_off_pages() -> None:
    fenced = extract_html("Here it is:\n```html\n<!DOCTYPE html><html><body><p>hi</p></body></html>\n```\nEnjoy.")
    assert fenced is not None and fenced.html.startswith("<!DOCTYPE html>") and not fenced.repaired
    assert fenced.html.endswith("</html>") and "Enjoy" not in fenced.html
    bare = extract_html("Sure. <html><body><h1>Shop</h1></body></html> That is the page.")
    assert bare is not None and bare.html == "<html><body><h1>Shop</h1></body></html>"
    cut = extract_html("```html\n<html><body><div><ul><li>one<li>two</li><img src=a.png><p>half a sen")
    assert cut is not None and cut.repaired
    assert cut.html.endswith("</p></li></ul></div></body></html>")  # innermost first; no </img> (a void element)
    mid_tag = extract_html("<html><body><h1>T</h1><div cla")
    assert mid_tag is not None and mid_tag.repaired and mid_tag.html.endswith("<h1>T</h1>\n</body></html>")
    assert extract_html("A cat on a sofa. Use <b> for bold in HTML.") is None
    assert extract_html("```python\nprint('<html>')\n```") is None


# ----------------------------------------------------------------------------- the sandboxed renderer


def test_render_a_known_page_shows_its_pixels(chromium: str) -> None:
    image = _png(asyncio.run(_render(PAGE)))
    assert image.size == (1280, 800)
    assert image.getpixel((250, 150)) == (0, 170, 0)  # inside the green block
    assert image.getpixel((50, 20)) == (255, 255, 255)  # outside it
    assert image.getpixel((410, 150)) == (255, 255, 255)


def test_render_blocks_network_and_scripts(chromium: str, bait: Any) -> None:
    async def main() -> tuple[Image.Image, list[str], float]:
        async with bait as server:
            hostile = f"""<!doctype html><html><head>
            <link rel="stylesheet" href="{server.url}/style.css">
            <style>@font-face {{font-family: x; src: url({server.url}/font.woff)}}
                   body {{margin:0; font-family:x}}</style>
            <meta http-equiv="refresh" content="0; url={server.url}/away">
            </head><body style="background:#ffffff">
            <img src="{server.url}/pixel.png" width="10" height="10">
            <iframe src="{server.url}/frame"></iframe>
            <script>document.body.style.background = "#ff0000"; fetch("{server.url}/beacon");
                    while (true) {{}}</script>
            <div style="background-image:url({server.url}/bg.png);width:50px;height:50px"></div>
            </body></html>"""
            started = time.monotonic()
            png = await _render(hostile, timeout_s=10)
            elapsed = time.monotonic() - started
            await asyncio.sleep(0.3)  # a late request would have arrived by now
            return _png(png), list(server.hits), elapsed

    image, hits, elapsed = asyncio.run(main())
    assert hits == []  # not one request left the browser
    assert image.getpixel((600, 600)) == (255, 255, 255)  # the script did not run (no red background)
    assert elapsed < 10


def test_render_limits_time_size_and_height(chromium: str) -> None:
    with pytest.raises(RenderError, match="max_html_bytes"):
        asyncio.run(_render("<html><body>" + "x" * 5000 + "</body></html>", max_html_bytes=1024))
    started = time.monotonic()
    with pytest.raises(RenderError, match="longer than"):
        asyncio.run(_render(PAGE, timeout_s=0.001))
    assert time.monotonic() - started < 5
    tall = "<html><body style='margin:0'><div style='height:20000px;background:#0000ff'></div></body></html>"
    image = _png(asyncio.run(_render(tall, max_height_px=1500)))
    assert image.size == (1280, 1500) and image.getpixel((10, 1400)) == (0, 0, 255)


# ----------------------------------------------------------------------------- through the core


@contextlib.asynccontextmanager
async def _service(tmp_path: Path, answer: str, **render: Any) -> AsyncIterator[BotService]:
    db = Database(sqlite_url(tmp_path / "render.db"))
    await db.create_all()
    service = BotService(Settings.model_validate({"render": render}), db, ScriptedBackend(answer))
    try:
        yield service
    finally:
        await service.close()
        await db.dispose()


async def _website(service: BotService, thread: str = "t1") -> list[Any]:
    picture = io.BytesIO()
    Image.new("RGB", (32, 32), (250, 250, 250)).save(picture, format="PNG")
    request = Request("web", "local", "chat", thread, "u", "website", (ImageAttachment(picture.getvalue()),))
    return [e async for e in service.handle(request)]


async def _ask(tmp_path: Path, answer: str, **render: Any) -> list[Any]:
    async with _service(tmp_path, answer, **render) as service:
        return await _website(service)


def test_render_a_website_answer_comes_with_preview_and_file(chromium: str, tmp_path: Path) -> None:
    answer = "Here is the page:\n```html\n" + PAGE + "\n```"
    final = asyncio.run(_ask(tmp_path, answer))[-1]
    assert isinstance(final, Final) and final.kind == "answer" and final.text == answer
    preview, page = final.files
    assert (preview.filename, preview.mime, page.filename, page.mime) == (
        "website.png", "image/png", "website.html", "text/html",
    )  # fmt: skip
    assert _png(preview.data).getpixel((250, 150)) == (0, 170, 0)
    assert page.data.decode() == PAGE


def test_render_a_truncated_answer_still_gives_a_preview(chromium: str, tmp_path: Path) -> None:
    answer = "```html\n<html><body style='margin:0'><div style='width:400px;height:300px;background:#0000ff'><p>Menu"
    final = asyncio.run(_ask(tmp_path, answer))[-1]
    assert final.text.endswith(REPAIRED_NOTE)
    preview, page = final.files
    assert page.data.decode().endswith("</p></div></body></html>")
    assert _png(preview.data).getpixel((200, 150)) == (0, 0, 255)


def _warnings(caplog: Any, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def test_render_without_chromium_gives_the_file_and_says_how_once_at_start(tmp_path: Path, caplog: Any) -> None:
    """Issue 26, item 11: the hint was logged at the first website answer, and said twice in that line."""
    caplog.set_level(logging.WARNING)
    answer = "```html\n" + PAGE + "\n```"

    async def main() -> tuple[list[str], list[Any]]:
        async with _service(tmp_path, answer, chromium_path="/nonexistent/chromium") as service:
            at_start = _warnings(caplog, "website previews are off")
            return at_start, [(await _website(service, thread))[-1] for thread in ("t1", "t2")]

    at_start, finals = asyncio.run(main())
    for final in finals:
        assert [f.filename for f in final.files] == ["website.html"]
    (warning,) = at_start  # before any answer
    assert "'/nonexistent/chromium' is not an executable file" in warning
    assert warning.count("apt-get install chromium") == 1
    assert _warnings(caplog, "website previews are off") == at_start  # and never again per answer


def test_render_as_root_says_once_at_start_that_chromium_has_no_sandbox(
    chromium: str, tmp_path: Path, caplog: Any
) -> None:
    """Issue 26, item 21: root means --no-sandbox; say it, with what to do.  Not root: Chromium keeps its sandbox."""
    caplog.set_level(logging.WARNING)
    answer = "```html\n" + PAGE + "\n```"
    final = asyncio.run(_ask(tmp_path, answer))[-1]
    assert [f.filename for f in final.files] == ["website.png", "website.html"]  # renders either way
    warnings = _warnings(caplog, "--no-sandbox")
    assert len(warnings) == (1 if os.geteuid() == 0 else 0)
    assert all("non-root user" in w for w in warnings)
    assert "--no-sandbox" in chromium_args(as_root=True) and "--no-sandbox" not in chromium_args(as_root=False)
    caplog.clear()
    (tmp_path / "off").mkdir()
    asyncio.run(_ask(tmp_path / "off", answer, enabled=False))
    assert not _warnings(caplog, "website previews")  # previews off in bot.toml: nothing to warn about


def test_render_disabled_or_no_page_means_no_files(tmp_path: Path) -> None:
    plain = asyncio.run(_ask(tmp_path, "A bowl of ramen."))[-1]
    assert plain.files == ()
    (tmp_path / "off").mkdir()
    off = asyncio.run(_ask(tmp_path / "off", "```html\n" + PAGE + "\n```", enabled=False))[-1]
    assert [f.filename for f in off.files] == ["website.html"]


class _Page:
    """Stands in for a Playwright page whose first captures fail as Chromium's do while the page navigates."""

    def __init__(self, failures: list[str]) -> None:
        self.failures, self.calls = failures, 0

    async def screenshot(self, **_: Any) -> bytes:
        self.calls += 1
        if self.failures:
            raise RuntimeError(self.failures.pop(0))
        return b"png"


def test_a_capture_that_fails_while_the_page_navigates_is_tried_again() -> None:
    from bot.core.screenshot import CAPTURE_TRIES, _screenshot

    unable = "Page.screenshot: Protocol error (Page.captureScreenshot): Unable to capture screenshot"
    page = _Page([unable, unable])
    assert asyncio.run(_screenshot(page, 1000)) == b"png" and page.calls == 3
    page = _Page([unable] * CAPTURE_TRIES)
    with pytest.raises(RuntimeError, match="Unable to capture"):
        asyncio.run(_screenshot(page, 1000))
    page = _Page(["Target page, context or browser has been closed"])  # another failure: not tried again
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(_screenshot(page, 1000))
    assert page.calls == 1
