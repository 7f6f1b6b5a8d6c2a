"""Rendering untrusted HTML to a PNG preview in a sandboxed headless Chromium (Playwright).

The page is model output, so it is treated as hostile:

* **no JavaScript** (the browser context has it switched off, so a script cannot run, loop or fetch);
* **no network**: the context is offline and every request the page makes — stylesheets, fonts,
  images, beacons, a meta refresh — is aborted before it leaves the browser; only the document given
  to ``set_content`` exists;
* **a fresh profile per render**: a new browser context (no cookies, storage or cache from any other
  render), closed afterwards;
* **limits**: the HTML size (``max_html_bytes``), a wall-clock ``timeout_s`` for the whole render, a
  1280×800 viewport grown to the page's height up to ``max_height_px``, and at most ``max_concurrent``
  renders at once.

The browser is the system Chromium (``[render] chromium_path``, else found on ``PATH``): browser
downloads are not part of installing the bot.  Playwright drives it without blocking the event loop.
Chromium's own process sandbox cannot start as root, so a bot running as root launches it with
``--no-sandbox`` (:func:`runs_as_root`); :mod:`bot.core.previews` says so once at start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from typing import Any, Protocol, runtime_checkable

from bot.core.config import RenderSettings
from bot.core.shutdown import close_quietly

__all__ = [
    "CHROMIUM_NAMES", "ENABLE_HINT", "NO_SANDBOX_HINT", "ChromiumRenderer", "PageRenderer", "RenderError",
    "chromium_args", "find_chromium", "missing_chromium", "runs_as_root",
]  # fmt: skip

log = logging.getLogger(__name__)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
VIEWPORT = {"width": 1280, "height": 800}
ENABLE_HINT = "install Chromium (Debian/Ubuntu: apt-get install chromium) or set [render] chromium_path in bot.toml"
NO_SANDBOX_HINT = (
    "the bot runs as root, so Chromium renders website previews without its own sandbox (--no-sandbox): "
    "JavaScript and network stay off, but a flaw in Chromium would run as root. Run the bot as a non-root "
    "user (the Docker image runs as uid 10001), or set [render] enabled = false"
)
LAUNCH_HINT = (
    "fix the launch error (as a non-root user Chromium's sandbox needs user namespaces, which a container's "
    "seccomp profile may forbid: docs/scaling.md), or set [render] enabled = false"
)


class RenderError(Exception):
    """A page could not be rendered; ``str(exc)`` is for logs.  ``unavailable``: no browser at all, and
    ``hint`` says how to get one (logged once, apart from the message, so it is never said twice)."""

    def __init__(self, message: str, *, unavailable: bool = False, hint: str = "") -> None:
        super().__init__(message)
        self.unavailable = unavailable
        self.hint = hint


@runtime_checkable
class PageRenderer(Protocol):
    """Turns an HTML document into a PNG screenshot (raises :class:`RenderError`)."""

    async def render(self, html: str) -> bytes: ...

    async def close(self) -> None: ...


def find_chromium(configured: str = "") -> str | None:
    """The Chromium executable: the configured path if it exists, else the first of :data:`CHROMIUM_NAMES` on PATH."""
    if configured:
        return configured if os.path.isfile(configured) and os.access(configured, os.X_OK) else None
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def missing_chromium(configured: str = "") -> str:
    """Why :func:`find_chromium` found nothing, for the log (without the hint)."""
    if configured:
        return f"[render] chromium_path = {configured!r} is not an executable file"
    return f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)})"


def runs_as_root() -> bool:
    """Whether this process is root: Chromium's sandbox then cannot start and is switched off."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


def chromium_args(as_root: bool) -> list[str]:
    """Chromium's command-line switches: no GPU, and no sandbox only where it cannot run (root)."""
    return ["--no-sandbox", "--disable-gpu"] if as_root else ["--disable-gpu"]


CAPTURE_TRIES = 3  # a capture that fails while the page tries to navigate away is tried again


async def _screenshot(page: Any, timeout_ms: float) -> bytes:
    """The page as PNG.  A page that tries to navigate (``<meta http-equiv="refresh">``: every request is
    aborted, so it stays) can make Chromium fail a capture made at that moment ("Unable to capture
    screenshot"), more often on a busy host: wait a little and capture again."""

    async def capture() -> bytes:
        return bytes(await page.screenshot(type="png", timeout=timeout_ms, animations="disabled"))

    for attempt in range(1, CAPTURE_TRIES):
        try:
            return await capture()
        except Exception as exc:
            if "Unable to capture screenshot" not in str(exc):
                raise
            log.info("Chromium could not capture the page (attempt %d); capturing again", attempt)
            await asyncio.sleep(0.2 * attempt)
    return await capture()  # the last try: its failure is the render's


class ChromiumRenderer:
    """One headless Chromium launched on first use (and again if it dies), a fresh context per render."""

    def __init__(self, settings: RenderSettings) -> None:
        self.settings = settings
        self._semaphore = asyncio.Semaphore(settings.max_concurrent)
        self._lock = asyncio.Lock()
        self._playwright: Any = None
        self._browser: Any = None

    async def render(self, html: str) -> bytes:
        size = len(html.encode("utf-8", errors="replace"))
        if size > self.settings.max_html_bytes:
            limit = self.settings.max_html_bytes
            raise RenderError(f"the page is {size} bytes, over [render] max_html_bytes = {limit}")
        async with self._semaphore:
            try:
                return await asyncio.wait_for(self._render(html), self.settings.timeout_s)
            except TimeoutError:
                raise RenderError(f"rendering took longer than {self.settings.timeout_s:g} s") from None

    async def _render(self, html: str) -> bytes:
        browser = await self._ensure_browser()
        context = await browser.new_context(
            java_script_enabled=False,
            offline=True,
            viewport=VIEWPORT,
            service_workers="block",
            accept_downloads=False,
            bypass_csp=False,
        )
        try:
            page = await context.new_page()
            await page.route("**/*", _abort)
            timeout_ms = self.settings.timeout_s * 1000
            await page.set_content(html, wait_until="load", timeout=timeout_ms)
            height = max(VIEWPORT["height"], min(await _page_height(page), self.settings.max_height_px))
            await page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
            return await _screenshot(page, timeout_ms)
        except RenderError:
            raise
        except Exception as exc:
            raise RenderError(f"Chromium failed to render the page: {type(exc).__name__}: {exc}") from exc
        finally:
            await close_quietly(context.close)

    async def _ensure_browser(self) -> Any:
        async with self._lock:
            if self._browser is not None and self._browser.is_connected():
                return self._browser
            executable = find_chromium(self.settings.chromium_path)
            if executable is None:
                raise RenderError(missing_chromium(self.settings.chromium_path), unavailable=True, hint=ENABLE_HINT)
            try:
                from playwright.async_api import async_playwright
            except ImportError:  # pragma: no cover - playwright is a dependency
                missing = "the playwright package is missing"
                raise RenderError(missing, unavailable=True, hint="pip install playwright") from None
            if self._playwright is None:
                self._playwright = await async_playwright().start()
            # Chromium's own sandbox cannot run as root: JavaScript and network stay off either way.
            try:
                self._browser = await self._playwright.chromium.launch(
                    executable_path=executable, headless=True, args=chromium_args(runs_as_root())
                )
            except Exception as exc:
                message = f"cannot start Chromium at {executable}: {type(exc).__name__}: {_first_line(exc)}"
                raise RenderError(message, unavailable=True, hint=LAUNCH_HINT) from exc
            log.info("website previews: headless Chromium at %s", executable)
            return self._browser

    async def close(self) -> None:
        browser, self._browser = self._browser, None
        await close_quietly(browser.close if browser is not None else None)
        playwright, self._playwright = self._playwright, None
        await close_quietly(playwright.stop if playwright is not None else None)


def _first_line(exc: Exception) -> str:
    """Playwright's launch errors carry the whole browser log: the first line says what failed."""
    return (str(exc).strip().splitlines() or [""])[0][:300]


async def _page_height(page: Any) -> int:
    """The document's height; a page that tries to navigate away (a meta refresh, blocked) may reset the
    script context once, so the measurement is retried; the viewport height if it never settles."""
    for _ in range(5):
        try:
            return int(await page.evaluate(_HEIGHT) or 0)
        except Exception:  # "Execution context was destroyed": the blocked navigation; measure again
            await asyncio.sleep(0.05)
    return VIEWPORT["height"]


_HEIGHT = "Math.max(document.documentElement.scrollHeight, document.body ? document.body.scrollHeight : 0)"


async def _abort(route: Any) -> None:
    """Every request the page makes is refused inside the browser: nothing leaves the machine."""
    await route.abort("blockedbyclient")
