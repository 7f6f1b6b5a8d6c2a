"""The chat page in a real headless Chromium, driven over the Chrome DevTools Protocol (aiohttp websocket).

The bot (real BotService on SQLite, real engine on demo weights) runs with ``run_web`` on a free
loopback port in a background event loop; the test opens the page, attaches a picture through the
file input, asks, waits for the streamed answer, follows up, reloads, and takes a screenshot.
Chromium is the Debian package ``chromium`` (``.ci/run`` installs it); without it the test fails.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from browser import CDP, with_chromium
from PIL import Image
from web_helpers import BackgroundWeb, make_settings, png_bytes, start_demo_engine

from bot.core.requests import ThreadRef
from model.engine.local_backend import EngineBackend


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class BackgroundBot(BackgroundWeb):
    """The web front end on the real engine over demo weights; records what ``run_web`` logged at start."""

    def __init__(self, folder: Path) -> None:
        self.engine = start_demo_engine(folder / "demo")
        super().__init__(folder, EngineBackend(self.engine, info={"demo": True}), make_settings(), "page")

    async def _start(self) -> None:
        logger = logging.getLogger("adapters.web")
        handler = _ListHandler()
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            await super()._start()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        self.logged = handler.messages

    async def turns(self, thread: str) -> list[Any]:
        conversation = await self.db.live_conversation(ThreadRef("web", "local", "chat", thread))
        return [] if conversation is None else await self.db.turns(conversation.id)

    def stop(self) -> None:
        super().stop()
        self.engine.stop()


@pytest.fixture(scope="module")
def bot(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from BackgroundBot(tmp_path_factory.mktemp("web-page")).running()


MARKUP = ("<b id=inj>bold?</b>", "```html\n<b id=inj>bold?</b>\n```")


def test_chat_page_in_headless_chromium(bot: BackgroundBot, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{bot.port}"
    picture = tmp_path / "dinner.png"
    picture.write_bytes(png_bytes((230, 140, 20), (120, 90)))
    screenshot = tmp_path / "chat.png"

    async def main(cdp: CDP, _http: aiohttp.ClientSession, _devtools: int) -> None:
        await drive(cdp, bot, base, picture, screenshot)

    assert f"web chat on {base}/" in bot.logged  # run_web logs where the chat is
    asyncio.run(asyncio.wait_for(with_chromium(tmp_path, main), 90))


async def drive(cdp: CDP, bot: BackgroundBot, base: str, picture: Path, screenshot: Path) -> None:
    for domain in ("Page", "Runtime", "Network", "Log"):
        await cdp.send(f"{domain}.enable")
    await cdp.send("Page.navigate", url=base + "/")
    await cdp.wait_for("document.body && document.body.dataset.ready === '1'")
    await cdp.wait_for("document.querySelectorAll('#preset option').length > 1")
    presets = await cdp.eval("Array.from(document.querySelectorAll('#preset option'), o => o.value)")
    assert presets[0] == "" and "recipe" in presets and "describe" in presets
    info = await cdp.wait_for("document.getElementById('model-info').textContent")
    assert "vicuna0" in info and "demo" in info
    thread = await cdp.eval("localStorage.getItem('minigpt4.thread')")
    assert thread and await cdp.eval("document.body.dataset.thread") == thread

    # Every control has an accessible name.
    unnamed = await cdp.eval(
        "Array.from(document.querySelectorAll('button, select, textarea, input'))"
        ".filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')"
        " && !el.textContent.trim()).map(el => el.id)"
    )
    assert unnamed == []

    # Attach a picture through the file input, type a question, click Send.
    document = await cdp.send("DOM.getDocument")
    node = await cdp.send("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file-input")
    await cdp.send("DOM.setFileInputFiles", files=[str(picture)], nodeId=node["nodeId"])
    await cdp.wait_for("document.querySelectorAll('#attachments img').length === 1")
    await cdp.type_into("#question", "What can I cook with this?")
    await cdp.click("#send")

    final = "document.querySelectorAll('.msg.bot[data-state=final]').length"
    await cdp.wait_for(f"{final} === 1")
    assert await cdp.eval("document.querySelector('.msg.bot').dataset.kind") == "answer"
    assert await cdp.eval("document.querySelector('#attachments').children.length") == 0
    await cdp.wait_for("document.querySelector('.msg.user img.thumb').naturalWidth === 120")

    # Follow-up in the same thread, sent with Enter; its text carries markup and a code fence.
    await cdp.type_into("#question", "And for dessert? " + MARKUP[1])
    await cdp.press_enter()
    await cdp.wait_for(f"{final} === 2")
    kinds = await cdp.eval("Array.from(document.querySelectorAll('.msg.bot'), m => m.dataset.kind)")
    assert kinds == ["answer", "answer"]
    assert await cdp.eval("document.querySelectorAll('.msg.user').length") == 2
    # Text is rendered as text: no element was created from the markup, and the fence became <pre>.
    assert await cdp.eval("document.getElementById('inj')") is None
    assert await cdp.eval("document.querySelector('.msg.user pre code').textContent") == MARKUP[0]
    shown = await cdp.eval("Array.from(document.querySelectorAll('.msg.bot .body'), b => b.textContent)")
    answer_bg = await cdp.eval("getComputedStyle(document.querySelector('.msg.bot')).backgroundColor")

    turns = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(bot.turns(thread), bot.loop))
    assert [(t.role, t.status) for t in turns] == [
        ("user", "done"), ("assistant", "done"), ("user", "done"), ("assistant", "done"),
    ]  # fmt: skip
    assert turns[0].image_id is not None and turns[2].image_id is None
    assert [turns[1].text, turns[3].text] == shown and all(shown)

    data = base64.b64decode((await cdp.send("Page.captureScreenshot", format="png"))["data"])
    screenshot.write_bytes(data)
    assert screenshot.stat().st_size > 1000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as shot:
        assert shot.size[0] > 300 and shot.size[1] > 300

    # Reloading shows the same conversation from /api/threads.
    await cdp.send("Page.reload")
    await cdp.wait_for("document.body && document.body.dataset.ready === '1'")
    assert await cdp.eval("localStorage.getItem('minigpt4.thread')") == thread
    assert await cdp.eval("Array.from(document.querySelectorAll('.msg.bot .body'), b => b.textContent)") == shown
    assert await cdp.eval("document.querySelectorAll('.msg.user').length") == 2

    # New chat: a new thread id and an empty log; a question without a picture gets a notice bubble.
    await cdp.click("#new-chat")
    new_thread = await cdp.eval("localStorage.getItem('minigpt4.thread')")
    assert new_thread and new_thread != thread
    assert await cdp.eval("document.querySelectorAll('.msg').length") == 0
    await cdp.type_into("#question", "hello?")
    await cdp.click("#send")
    await cdp.wait_for(f"{final} === 1")
    notice = await cdp.eval(
        "(() => { const m = document.querySelector('.msg.bot'); return {kind: m.dataset.kind,"
        " cls: m.className, text: m.textContent, bg: getComputedStyle(m).backgroundColor}; })()"
    )
    assert notice["kind"] == "notice" and "notice" in notice["cls"].split()
    assert "I need a picture" in notice["text"]
    assert notice["bg"] != answer_bg  # notices are styled apart from answers

    # Pasting and dropping pictures attach them too; × removes one.
    png_js = json.dumps(list(png_bytes((0, 90, 30), (20, 20))))
    make_files = (
        f"const dt = new DataTransfer(); dt.items.add(new File([new Uint8Array({png_js})], 'p.png',"
        " {type: 'image/png'}));"
    )
    await cdp.eval(f"{{ {make_files} document.dispatchEvent(new ClipboardEvent('paste', {{clipboardData: dt}})) }}")
    await cdp.wait_for("document.querySelectorAll('#attachments img').length === 1")
    await cdp.eval(f"{{ {make_files} document.body.dispatchEvent(new DragEvent('drop', {{dataTransfer: dt}})) }}")
    await cdp.wait_for("document.querySelectorAll('#attachments img').length === 2")
    await cdp.click("#attachments .remove")
    await cdp.wait_for("document.querySelectorAll('#attachments img').length === 1")

    # Nothing went wrong in the page, and nothing was fetched from anywhere else.
    errors = [e for e in cdp.events if e.get("method") == "Runtime.exceptionThrown"]
    errors += [
        e for e in cdp.events if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
    ]
    assert errors == []
    urls = [e["params"]["request"]["url"] for e in cdp.events if e.get("method") == "Network.requestWillBeSent"]
    assert urls and all(u.startswith((base + "/", "data:", "blob:")) for u in urls), urls
