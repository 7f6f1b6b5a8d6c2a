"""The chat page in a real headless Chromium, driven over the Chrome DevTools Protocol (aiohttp websocket).

The bot (real BotService on SQLite, real engine on demo weights) runs with ``run_web`` on a free
loopback port in a background event loop; the test opens the page, attaches a picture through the
file input, asks, waits for the streamed answer, follows up, reloads, and takes a screenshot.
Chromium is the Debian package ``chromium`` (``.ci/run`` installs it); without it the test fails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from web_helpers import make_settings, png_bytes, start_demo_engine

from adapters.web import run_web
from bot.core.service import BotService
from model.engine.backend import EngineBackend
from storage import ConversationKey, Database, sqlite_url

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--window-size=1100,800",
    "--remote-debugging-port=0",
]


def find_chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM", ""), "/usr/bin/chromium", "chromium", "chromium-browser"):
        if candidate and (path := shutil.which(candidate)):
            return path
    pytest.fail(
        "Chromium is needed for the web page test but was not found: install the Debian package "
        "(`apt-get update && apt-get install -y chromium`; .ci/run does this) or set $CHROMIUM to its path."
    )


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class BackgroundBot:
    """The bot's web front end on its own event loop in a thread (as ``minigpt4-bot serve`` runs it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="web-test-loop", daemon=True)
        self.engine = start_demo_engine(folder / "demo")
        self.port = 0

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.call(self._start())

    async def _start(self) -> None:
        self.db = Database(sqlite_url(self.folder / "page.db"))
        await self.db.create_all()
        self.service = BotService(make_settings(), self.db, EngineBackend(self.engine, info={"demo": True}))
        logger = logging.getLogger("adapters.web")
        handler = _ListHandler()
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            self.runner = await run_web(self.service, "127.0.0.1", 0)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        self.port = self.runner.addresses[0][1]
        self.logged = handler.messages

    async def turns(self, thread: str) -> list[Any]:
        conversation = await self.db.live_conversation(ConversationKey("web", "local", "chat", thread))
        return [] if conversation is None else await self.db.turns(conversation.id)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.runner.cleanup())
            self.call(self.db.dispose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.engine.stop()


class CDPError(RuntimeError):
    pass


class CDP:
    """A minimal Chrome DevTools Protocol client for one page target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            future = self.pending.pop(data["id"], None) if "id" in data else None
            if future is None:
                self.events.append(data)
            elif "error" in data:
                future.set_exception(CDPError(f"{data['error']}"))
            else:
                future.set_result(data.get("result", {}))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        return await asyncio.wait_for(future, 30)

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            await asyncio.sleep(0.05)

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = await self.eval(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    async def press_enter(self) -> None:
        key = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13}
        await self.send("Input.dispatchKeyEvent", type="keyDown", text="\r", **key)
        await self.send("Input.dispatchKeyEvent", type="keyUp", **key)

    async def type_into(self, selector: str, text: str) -> None:
        await self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", text=text)


async def wait_for_devtools(profile: Path, process: subprocess.Popen[bytes], log_file: Path) -> int:
    deadline = time.monotonic() + 30
    port_file = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Chromium exited with {process.returncode}:\n{log_file.read_text(errors='replace')[-3000:]}")
        if port_file.is_file() and (lines := port_file.read_text().split()):
            return int(lines[0])
        await asyncio.sleep(0.05)
    pytest.fail(f"Chromium did not open its DevTools port:\n{log_file.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def bot(tmp_path_factory: pytest.TempPathFactory) -> Any:
    running = BackgroundBot(tmp_path_factory.mktemp("web-page"))
    running.start()
    yield running
    running.stop()


MARKUP = ("<b id=inj>bold?</b>", "```html\n<b id=inj>bold?</b>\n```")


def test_chat_page_in_headless_chromium(bot: BackgroundBot, tmp_path: Path) -> None:
    chromium = find_chromium()
    base = f"http://127.0.0.1:{bot.port}"
    picture = tmp_path / "dinner.png"
    picture.write_bytes(png_bytes((230, 140, 20), (120, 90)))
    profile = tmp_path / "profile"
    log_file = tmp_path / "chromium.log"
    screenshot = tmp_path / "chat.png"

    async def main() -> None:
        with log_file.open("wb") as log:
            process = subprocess.Popen(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            port = await wait_for_devtools(profile, process, log_file)
            async with aiohttp.ClientSession() as http:
                targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
                page = next(t for t in targets if t["type"] == "page")
                async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    cdp = CDP(ws)
                    await drive(cdp, bot, base, picture, screenshot)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    assert f"web chat on {base}/" in bot.logged  # run_web logs where the chat is
    asyncio.run(asyncio.wait_for(main(), 90))


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
