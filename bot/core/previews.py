"""Website previews: an answer that holds a web page comes back with a screenshot of it and the ``.html`` file.

MiniGPT-4's sketch-to-website demo answers with HTML; nobody can look at that in a chat message.  For
every answer that contains an HTML document (:func:`~bot.core.website.extract_html`), the core adds
two :class:`~bot.core.requests.ReplyFile` values to the final reply — ``website.png`` (rendered in the
sandbox of :mod:`bot.core.screenshot`) and ``website.html`` — and each front end shows them its own way.
A page cut off at the token limit is completed and the reply says so.  An answer with boxes in it
(MiniGPT-v2's grounding) gets its picture with the boxes drawn first (:mod:`bot.core.grounding`).
Without Chromium the reply carries the file alone; the log says so once, when the core is built (at
start, not at the first ``website`` answer), with how to turn previews on — and warns once when Chromium
will run without its sandbox because the bot runs as root.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from prometheus_client import Counter, Histogram

from bot.core import screenshot
from bot.core.config import GroundingSettings, RenderSettings
from bot.core.grounding import GroundedPictures
from bot.core.metrics import BotMetrics
from bot.core.requests import Final, ReplyFile
from bot.core.screenshot import ChromiumRenderer, PageRenderer, RenderError
from bot.core.website import extract_html

__all__ = ["REPAIRED_NOTE", "WebsitePreviews"]

log = logging.getLogger(__name__)

REPAIRED_NOTE = "(The page was cut off at the answer length limit; the preview and the file close its open tags.)"


class WebsitePreviews:
    """Adds the preview and the page file to a final answer that contains an HTML document."""

    def __init__(
        self,
        settings: RenderSettings,
        metrics: BotMetrics,
        renderer: PageRenderer | None = None,
        grounding: GroundingSettings | None = None,
    ) -> None:
        self.settings = settings
        self.grounded = GroundedPictures(grounding or GroundingSettings())
        self.renderer = renderer if renderer is not None else (ChromiumRenderer(settings) if settings.enabled else None)
        self._warned = False  # previews-off said once per process (per core): at start, or at the first failure
        self.renders = Counter(
            "minigpt4_renders", "Website previews, by outcome (ok | failed | unavailable)", ["outcome"],
            registry=metrics.registry,
        )  # fmt: skip
        self.render_seconds = Histogram(
            "minigpt4_render_seconds", "Time to render one website preview", registry=metrics.registry,
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30),
        )  # fmt: skip
        self._say_at_start()

    def _say_at_start(self) -> None:
        """What an operator must know before the first ``website`` answer: previews are off (no Chromium),
        or Chromium will run without its sandbox (root).  Only for the built-in Chromium renderer."""
        if not isinstance(self.renderer, ChromiumRenderer):
            return  # previews disabled in bot.toml, or a renderer of the caller's own
        if screenshot.find_chromium(self.settings.chromium_path) is None:
            self._warned = True
            why = screenshot.missing_chromium(self.settings.chromium_path)
            log.warning(_OFF, why, screenshot.ENABLE_HINT)
        elif screenshot.runs_as_root():
            log.warning("website previews: %s", screenshot.NO_SANDBOX_HINT)

    async def attach(self, final: Final, picture: bytes | None = None, question: str = "") -> Final:
        """``final`` with ``website.png`` (when rendering works) and ``website.html`` added, if it holds a page;
        with ``boxes.png`` (its boxes drawn on ``picture``, the thread's latest) if it holds boxes or
        ``question`` asked about a region (``identify``)."""
        if final.kind != "answer":
            return final
        final = await self.grounded.attach(final, picture, question)
        page = extract_html(final.text)
        if page is None:
            return final
        files = [ReplyFile("website.html", "text/html", page.html.encode("utf-8"), title="The page as an HTML file")]
        preview = await self._render(page.html)
        if preview is not None:
            title = "Preview (rendered without scripts or network access)"
            files.insert(0, ReplyFile("website.png", "image/png", preview, title=title))
        text = f"{final.text}\n\n{REPAIRED_NOTE}" if page.repaired else final.text
        return dataclasses.replace(final, text=text, files=(*final.files, *files))

    async def _render(self, html: str) -> bytes | None:
        if self.renderer is None:
            return None
        started = time.monotonic()
        try:
            png = await self.renderer.render(html)
        except RenderError as exc:
            if exc.unavailable:
                self.renders.labels("unavailable").inc()
                if not self._warned:
                    self._warned = True
                    log.warning(_OFF, exc, exc.hint)
            else:
                self.renders.labels("failed").inc()
                log.warning("website preview failed: %s", exc)
            return None
        self.renders.labels("ok").inc()
        self.render_seconds.observe(time.monotonic() - started)
        return png

    async def close(self) -> None:
        if self.renderer is not None:
            await self.renderer.close()


_OFF = "website previews are off (%s); answers carry the .html file only. To turn them on: %s"
