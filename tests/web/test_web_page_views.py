"""The chat page in real headless Chromium, over CDP (the harness of ``test_web_page``), on a scripted
backend (issue 26): the phone-width layout (item 3), reloaded history as the user sent it — preset tag and
words, thumbnails (item 7), ``reset`` clearing the screen (item 9), and a ``website`` answer's ``.html``
offered inert, so opening it runs nothing at the bot's origin (item 13).

Screenshots are left in the test's tmp folder (``phone.png``, ``desktop.png``); with ``$WEB_SHOTS`` set
they are copied there too, for a person to look at.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from browser import CDP, CDPError, with_chromium
from web_helpers import BackgroundWeb, make_settings, png_bytes

from tests.scripted_backend import ScriptedBackend

# The model's page tries what the did: run at the bot's origin, read the thread id, fetch history.
EVIL_PAGE = (
    "<!doctype html><html><head><title>Shop</title></head><body><h1>Shop</h1>"
    "<script>localStorage.setItem('pwned', location.origin);"
    "fetch('/api/threads/' + localStorage.getItem('minigpt4.thread'));</script></body></html>"
)
WEBSITE_ANSWER = f"Here is the page:\n```html\n{EVIL_PAGE}\n```"
LONG_ANSWER = "A tidy little shop front with a striped awning, two windows and a door. " * 4


class ScriptedBot(BackgroundWeb):
    """The web front end on a scripted backend (answers in order); no previews rendered (the .html alone)."""

    def __init__(self, folder: Path) -> None:
        self.backend = ScriptedBackend(LONG_ANSWER)
        super().__init__(folder, self.backend, make_settings(render={"enabled": False}), "views")


@pytest.fixture(scope="module")
def bot(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from ScriptedBot(tmp_path_factory.mktemp("web-views")).running()


async def viewport(cdp: CDP, width: int, height: int, *, mobile: bool) -> None:
    await cdp.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                   mobile=mobile)  # fmt: skip


async def layout(cdp: CDP) -> dict[str, Any]:
    """What a person would check at this width: the question box's size, sideways scrolling, whether Send and
    the picture button are on screen, whether a message fits."""
    return await cdp.eval(
        "(() => { const r = (s) => document.querySelector(s).getBoundingClientRect();"
        " const on = (b) => b.width > 0 && b.left >= 0 && b.right <= innerWidth && b.bottom <= innerHeight;"
        " const msgs = Array.from(document.querySelectorAll('.msg'), m => m.getBoundingClientRect());"
        " return {textarea: r('#question').width, scroll: document.scrollingElement.scrollWidth,"
        " inner: innerWidth, send: on(r('#send')), picture: on(r('.file-button')), preset: on(r('#preset')),"
        " messages_fit: msgs.every(m => m.left >= 0 && m.right <= innerWidth),"
        " widest_overflow: Math.max(0, ...Array.from(document.querySelectorAll("
        "   '.topbar, .messages, .msg, .msg pre, .composer, .composer .row'),"
        "   e => e.getBoundingClientRect().right - innerWidth))}; })()"
    )


async def screenshot(cdp: CDP, path: Path) -> None:
    path.write_bytes(base64.b64decode((await cdp.send("Page.captureScreenshot", format="png"))["data"]))
    if shots := os.environ.get("WEB_SHOTS"):
        Path(shots).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(shots) / path.name)


async def attach(cdp: CDP, picture: Path) -> None:
    document = await cdp.send("DOM.getDocument")
    node = await cdp.send("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file-input")
    await cdp.send("DOM.setFileInputFiles", files=[str(picture)], nodeId=node["nodeId"])
    await cdp.wait_for("document.querySelectorAll('#attachments img').length === 1")


FINALS = "document.querySelectorAll('.msg.bot[data-state=final]').length"


def test_phone_layout_history_reset_and_inert_page(bot: ScriptedBot, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{bot.port}"
    picture = tmp_path / "sketch.png"
    picture.write_bytes(png_bytes((40, 120, 200), (120, 90)))
    bot.backend.script = [WEBSITE_ANSWER]  # the first answer is a page; the rest LONG_ANSWER

    async def drive(cdp: CDP, http: aiohttp.ClientSession, devtools: int) -> None:
        for domain in ("Page", "Runtime", "Network"):
            await cdp.send(f"{domain}.enable")
        await viewport(cdp, 390, 844, mobile=True)
        await cdp.send("Page.navigate", url=base + "/")
        await cdp.wait_for("document.body && document.body.dataset.ready === '1'")
        await cdp.wait_for("document.querySelectorAll('#preset option').length > 1")
        empty = await layout(cdp)
        assert empty["textarea"] >= 300 and empty["scroll"] <= empty["inner"] == 390, empty
        assert empty["send"] and empty["picture"] and empty["preset"], empty

        # A website question picked in the menu, with a picture and words of the user's.
        await attach(cdp, picture)
        await cdp.eval("document.getElementById('preset').value = 'website'")
        await cdp.type_into("#question", "with a blue header")
        await cdp.click("#send")
        await cdp.wait_for(f"{FINALS} === 1")
        assert await cdp.eval("document.getElementById('preset').value") == ""  # the menu was for one message

        # The offered .html is a download-only blob; opening it as a page (a new tab) runs nothing here.
        link = await cdp.eval(
            "(() => { const a = document.querySelector('.msg.bot a.download');"
            " return a && {href: a.href, name: a.download}; })()"
        )
        assert link and link["href"].startswith("blob:") and link["name"] == "website.html", link
        # Control: the same bytes as a text/html blob of this origin do run (what the old page offered),
        # so "nothing ran" below means the offered link is inert, not that the probe cannot see.
        control = await cdp.eval(f"URL.createObjectURL(new Blob([{EVIL_PAGE!r}], {{type: 'text/html'}}))")
        for url, expect_run in ((control, True), (link["href"], False)):
            await cdp.eval("localStorage.removeItem('pwned')")
            target = await cdp.send("Target.createTarget", url=url)
            try:
                if expect_run:
                    await cdp.wait_for("localStorage.getItem('pwned')", timeout=15)
                else:
                    await asyncio.sleep(1.5)  # give a page every chance to run (not a speed assertion)
                    assert await cdp.eval("localStorage.getItem('pwned')") is None
            finally:  # a download closes its tab by itself
                with contextlib.suppress(CDPError):
                    await cdp.send("Target.closeTarget", targetId=target["targetId"])

        # A follow-up, then reload: history shows what the user sent, not the preset's prompt.
        await cdp.type_into("#question", "make it shorter")
        await cdp.press_enter()
        await cdp.wait_for(f"{FINALS} === 2")
        await cdp.send("Page.reload")
        await cdp.wait_for("document.body && document.body.dataset.ready === '1'")
        users = await cdp.eval(
            "Array.from(document.querySelectorAll('.msg.user'), m => ({text: m.textContent,"
            " pre: m.querySelectorAll('pre').length, thumbs: Array.from(m.querySelectorAll('img.thumb'),"
            " i => ({src: i.getAttribute('src'), w: i.naturalWidth}))}))"
        )
        assert len(users) == 2, users
        assert users[0]["text"] == "[website]with a blue header" and users[0]["pre"] == 0, users
        assert "Write the HTML" not in users[0]["text"] and "[picture]" not in users[0]["text"]
        await cdp.wait_for("Array.from(document.querySelectorAll('.msg.user img.thumb')).every(i => i.naturalWidth)")
        thumbs = await cdp.eval("Array.from(document.querySelectorAll('.msg.user img.thumb'), i => i.naturalWidth)")
        assert thumbs == [120] and users[0]["thumbs"][0]["src"].startswith("/api/threads/"), users
        assert users[1]["text"] == "make it shorter" and users[1]["thumbs"] == []

        full = await layout(cdp)
        assert full["textarea"] >= 300 and full["scroll"] <= full["inner"], full
        assert full["messages_fit"] and full["widest_overflow"] <= 0 and full["send"], full
        await screenshot(cdp, tmp_path / "phone.png")

        await viewport(cdp, 1280, 800, mobile=False)
        desk = await layout(cdp)
        assert desk["textarea"] >= 600 and desk["scroll"] <= desk["inner"] == 1280 and desk["send"], desk
        # On a desktop the controls stay on one row, beside the question box.
        rows = await cdp.eval(
            "['.file-button', '#preset', '#question', '#send'].map(s => "
            "Math.round(document.querySelector(s).getBoundingClientRect().bottom))"
        )
        assert max(rows) - min(rows) <= 12, rows
        await screenshot(cdp, tmp_path / "desktop.png")

        # reset: the old messages leave the screen; only the reset exchange stays.
        await cdp.type_into("#question", "reset")
        await cdp.press_enter()
        await cdp.wait_for("document.querySelectorAll('.msg').length === 2 && "
                           "document.querySelector('.msg.bot').dataset.state === 'final'")  # fmt: skip
        shown = await cdp.eval("Array.from(document.querySelectorAll('.msg'), m => m.textContent)")
        assert shown[0] == "reset" and "Starting over" in shown[1], shown

    asyncio.run(asyncio.wait_for(with_chromium(tmp_path, drive), 120))


# Issue 24: an answer with boxes — phrases with markup in them, one of them a would-be script.
BOXES_ANSWER = (
    'There is <p>a <b>red</b> square</p> {<25><25><75><75>} under <p><img src=x onerror="window.pwned=1"></p> '
    "{<1><1><9><9>}."
)


def test_grounding_phrases_show_bold_and_their_markup_stays_text(bot: ScriptedBot, tmp_path: Path) -> None:
    """The cleaned answer's ``**phrase**`` is a <strong> (built as a DOM node, its words a text node), live and
    after a reload (history gives the answer as shown, issue 24 item 2); the raw box tokens that streamed are
    replaced by the final text; ``<b>`` and ``<img onerror>`` in a phrase stay text and run nothing."""
    base = f"http://127.0.0.1:{bot.port}"
    picture = tmp_path / "squares.png"
    picture.write_bytes(png_bytes((10, 10, 200), (80, 80)))
    bot.backend.script = [BOXES_ANSWER]
    bold = (
        "(() => { const b = document.querySelector('.msg.bot[data-state=final] .body');"
        " return b && {strong: Array.from(b.querySelectorAll('strong'), s => s.textContent),"
        " elements: Array.from(b.querySelectorAll('strong *, b, img'), e => e.tagName), text: b.textContent,"
        " pwned: window.pwned === undefined ? null : window.pwned}; })()"
    )

    async def drive(cdp: CDP, http: aiohttp.ClientSession, devtools: int) -> None:
        for domain in ("Page", "Runtime"):
            await cdp.send(f"{domain}.enable")
        await cdp.send("Page.navigate", url=base + "/")
        await cdp.wait_for("document.body && document.body.dataset.ready === '1'")
        await attach(cdp, picture)
        await cdp.type_into("#question", "where are the squares?")
        await cdp.click("#send")
        await cdp.wait_for(f"{FINALS} === 1")
        await cdp.wait_for("document.querySelectorAll('.msg.bot img.preview').length === 1")  # boxes.png inline
        for shown in (await cdp.eval(bold), None):
            if shown is None:  # the same answer from the stored history
                await cdp.send("Page.reload")
                await cdp.wait_for("document.body && document.body.dataset.ready === '1'")
                await cdp.wait_for(f"{FINALS} === 1")
                shown = await cdp.eval(bold)
            assert shown["strong"] == ["a <b>red</b> square", '<img src=x onerror="window.pwned=1">'], shown
            assert shown["elements"] == [] and shown["pwned"] is None, shown
            assert shown["text"] == 'There is a <b>red</b> square under <img src=x onerror="window.pwned=1">.'
        await asyncio.sleep(0.5)  # an <img onerror> would have fired by now (not a speed assertion)
        assert await cdp.eval("window.pwned === undefined")

    asyncio.run(asyncio.wait_for(with_chromium(tmp_path, drive), 120))
