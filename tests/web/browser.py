"""A headless Chromium driven over the Chrome DevTools Protocol (aiohttp websocket), for the web page tests.

Chromium is the Debian package ``chromium`` (``.ci/run`` installs it); without it the tests fail with how to
install it.  :func:`with_chromium` starts one on a fresh profile and hands ``drive`` a :class:`CDP` client for
its page; the browser is always ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

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


async def with_chromium(tmp_path: Path, drive: Callable[[CDP, aiohttp.ClientSession, int], Awaitable[None]]) -> None:
    """Start Chromium on a profile below ``tmp_path``, run ``drive(cdp, http, devtools_port)`` on its page, end it."""
    chromium = find_chromium()
    profile, log_file = tmp_path / "profile", tmp_path / "chromium.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"], stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        port = await wait_for_devtools(profile, process, log_file)
        async with aiohttp.ClientSession() as http:
            targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                await drive(CDP(ws), http, port)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
