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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from typing import Any, Protocol, runtime_checkable

from bot.core.config import RenderSettings

__all__ = ["CHROMIUM_NAMES", "ChromiumRenderer", "PageRenderer", "RenderError", "find_chromium"]

log = logging.getLogger(__name__)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
VIEWPORT = {"width": 1280, "height": 800}
ENABLE_HINT = "install Chromium (Debian/Ubuntu: apt-get install chromium) or set [render] chromium_path in bot.toml"


class RenderError(Exception):
    """A page could not be rendered; ``str(exc)`` is for logs.  ``unavailable``: no browser at all."""

    def __init__(self, message: str, *, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable


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
            return await page.screenshot(type="png", timeout=timeout_ms, animations="disabled")
        except RenderError:
            raise
        except Exception as exc:
            raise RenderError(f"Chromium failed to render the page: {type(exc).__name__}: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                await context.close()

    async def _ensure_browser(self) -> Any:
        async with self._lock:
            if self._browser is not None and self._browser.is_connected():
                return self._browser
            executable = find_chromium(self.settings.chromium_path)
            if executable is None:
                raise RenderError(f"no Chromium found: {ENABLE_HINT}", unavailable=True)
            try:
                from playwright.async_api import async_playwright
            except ImportError:  # pragma: no cover - playwright is a dependency
                raise RenderError("the playwright package is not installed", unavailable=True) from None
            if self._playwright is None:
                self._playwright = await async_playwright().start()
            # Chromium's own sandbox cannot run as root (containers): JavaScript and network stay off either way.
            args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
            try:
                self._browser = await self._playwright.chromium.launch(
                    executable_path=executable, headless=True, args=[*args, "--disable-gpu"]
                )
            except Exception as exc:
                raise RenderError(f"cannot start Chromium at {executable}: {exc}", unavailable=True) from exc
            log.info("website previews: headless Chromium at %s", executable)
            return self._browser

    async def close(self) -> None:
        browser, self._browser = self._browser, None
        if browser is not None:
            with contextlib.suppress(Exception):
                await browser.close()
        playwright, self._playwright = self._playwright, None
        if playwright is not None:
            with contextlib.suppress(Exception):
                await playwright.stop()


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
