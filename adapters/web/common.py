"""What every part of the web chat shares: its logger, the app and request keys, the thread id's form, the
picture types it shows inline, and the one-line JSON error."""

from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from bot.core.frontend_api import Core
from bot.core.requests import ThreadRef

log = logging.getLogger("adapters.web")  # one logger for the whole web front end, whichever module logs

THREAD_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
SERVICE_KEY = web.AppKey("core", Core)
CONFIG_KEY = web.AppKey("web_config", dict)
USER_KEY = web.RequestKey("user", str)  # request[USER_KEY]: who sent it (the auth proxy's header, else LOCAL_USER)
LOCAL_USER = "local"
RASTER_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"})
DOWNLOAD_TYPE = "application/octet-stream"


def shown_type(mime: str) -> str:
    """The type the chat serves a picture or a reply file as: a raster picture keeps its own; anything else
    (HEIC, a ``website`` answer's ``.html``: model output) is :data:`DOWNLOAD_TYPE`, so nothing served from
    the bot's origin is ever a page whose scripts run there."""
    return mime if mime in RASTER_TYPES else DOWNLOAD_TYPE


def thread_ref(request: web.Request, thread: str) -> ThreadRef | None:
    """The thread ``thread`` names in this chat's channel, for a message and the read-only API alike
    (``None``: not a thread id the page makes)."""
    if not THREAD_RE.match(thread):
        return None
    config = request.app[CONFIG_KEY]
    return ThreadRef(config["platform"], config["workspace"], config["channel"], thread)


def _json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """The exception's message on one line, cut to ``limit`` characters (it may quote the client's bytes)."""
    if isinstance(exc, UnicodeDecodeError):
        return f"the text is not valid {exc.encoding} (at byte {exc.start})"
    message = exc.message if isinstance(exc, HttpProcessingError) and exc.message else str(exc)
    text = " ".join(str(message).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
