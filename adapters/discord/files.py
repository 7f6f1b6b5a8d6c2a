"""Pictures attached to Discord messages and ``/ask``: checked, then downloaded at once (CDN links expire).

Discord tells the size, the type and (for pictures) the width and height of every attachment, so most bad
pictures are refused before a byte is fetched.  A picture that cannot be fetched (too large, too many pixels,
not a picture, an expired link, a failed download) becomes an :class:`~bot.core.requests.ImageAttachment`
with ``error`` set: the core answers it after dropping a redelivered event, so one message is never
answered twice.  The CDN needs no token: none is sent.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import discord

from bot.core.frontend_api import ImageLimits
from bot.core.images import format_size
from bot.core.requests import ImageAttachment

__all__ = ["DiscordFiles"]

log = logging.getLogger(__name__)


class _Refused(Exception):
    def __init__(self, user_message: str) -> None:
        super().__init__(user_message)
        self.user_message = user_message


def _mime(attachment: Any) -> str:
    mime = (attachment.content_type or "").split(";", 1)[0].strip().lower()
    return mime or (mimetypes.guess_type(attachment.filename or "")[0] or "")


class DiscordFiles:
    """Downloads a message's attachments: ``limits`` (read per message) come from the core, ``max_bytes``
    (``[discord] max_image_bytes``, 0 = the core's limit) may lower the size cap."""

    def __init__(self, limits: Callable[[], ImageLimits], max_bytes: int = 0, timeout_s: float = 60.0) -> None:
        self.limits, self.max_bytes, self.timeout_s = limits, max_bytes, timeout_s

    async def download(self, attachments: Sequence[discord.Attachment]) -> tuple[ImageAttachment, ...]:
        """The pictures, or — at the first one that cannot be fetched — that one alone, with its ``error``."""
        limits = self.limits()
        if len(attachments) > limits.max_per_message:
            # Nothing is downloaded: the core refuses the message for the count of pictures alone.
            return tuple(ImageAttachment(b"", filename=a.filename, mime=_mime(a)) for a in attachments)
        cap = min(self.max_bytes, limits.max_bytes) if self.max_bytes else limits.max_bytes
        pictures = []
        for attachment in attachments:
            try:
                pictures.append(await self._download_one(attachment, cap, limits))
            except _Refused as exc:
                name, mime = attachment.filename or "the picture", _mime(attachment)
                return (ImageAttachment(b"", filename=name, mime=mime, error=exc.user_message),)
        return tuple(pictures)

    async def _download_one(self, attachment: discord.Attachment, cap: int, limits: ImageLimits) -> ImageAttachment:
        name, mime, max_pixels = attachment.filename or "the picture", _mime(attachment), limits.max_pixels
        too_big = f"{name} is larger than {format_size(cap)}, the most I accept; please send a smaller picture."
        if mime and not mime.startswith("image/"):
            raise _Refused(f"{name} is not a picture ({mime}); I read {limits.formats_text('and')}.")
        if attachment.size > cap:
            raise _Refused(too_big)
        if attachment.width and attachment.height and attachment.width * attachment.height > max_pixels:
            raise _Refused(
                f"{name} has {attachment.width}×{attachment.height} pixels, more than I read "
                f"({max_pixels:,} at most); please send a smaller picture."
            )
        try:
            data = await asyncio.wait_for(attachment.read(), self.timeout_s)
        except discord.NotFound:
            raise _Refused(f"Discord's link to {name} has expired or was removed; please upload it again.") from None
        except discord.HTTPException as exc:
            log.warning("downloading a Discord attachment failed: HTTP %s", exc.status)
            raise _Refused(f"Discord answered HTTP {exc.status} for {name}; please upload it again.") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("downloading a Discord attachment failed: %s", type(exc).__name__)
            raise _Refused(f"I couldn't download {name} from Discord; please try again.") from None
        if len(data) > cap:
            raise _Refused(too_big)
        return ImageAttachment(data, filename=name, mime=mime)
