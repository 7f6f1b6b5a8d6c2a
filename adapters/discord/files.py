"""Pictures attached to Discord messages and ``/ask``: checked, then downloaded at once (CDN links expire).

Discord tells the size, the type and (for pictures) the width and height of every attachment, so most bad
pictures are refused before a byte is fetched.  The policy (the size cap that can only lower the core's,
the checks before a download, the refusal) is the one every chat platform shares,
:mod:`adapters.downloads`; this module adds Discord's own download and its errors.  The CDN needs no
token: none is sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp
import discord

from adapters.downloads import Declared, PictureDownloads, Refused, guess_mime
from bot.core.frontend_api import ImageLimits

__all__ = ["DiscordFiles"]

log = logging.getLogger(__name__)


class DiscordFiles(PictureDownloads[discord.Attachment]):
    """Downloads a message's attachments: ``limits`` (read per message) come from the core, ``max_bytes``
    (``[discord] max_image_bytes``, 0 = the core's limit) may lower the size cap, never raise it."""

    def __init__(self, limits: Callable[[], ImageLimits], max_bytes: int = 0, timeout_s: float = 60.0) -> None:
        super().__init__(limits, max_bytes)
        self.timeout_s = timeout_s

    def declared(self, item: discord.Attachment) -> Declared:
        mime = guess_mime(item.content_type, item.filename)
        return Declared(item.filename or "the picture", mime, item.size, item.width or 0, item.height or 0)

    async def fetch(self, item: discord.Attachment, file: Declared, cap: int) -> bytes:
        try:
            return await asyncio.wait_for(item.read(), self.timeout_s)
        except discord.NotFound:
            expired = f"Discord's link to {file.name} has expired or was removed; please upload it again."
            raise Refused(expired) from None
        except discord.HTTPException as exc:
            log.warning("downloading a Discord attachment failed: HTTP %s", exc.status)
            raise Refused(f"Discord answered HTTP {exc.status} for {file.name}; please upload it again.") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("downloading a Discord attachment failed: %s", type(exc).__name__)
            raise Refused(f"I couldn't download {file.name} from Discord; please try again.") from None
