"""Pictures attached to Slack messages: checked, then downloaded with the bot token from Slack's own hosts.

A picture that cannot be fetched (too large, not a picture, no Slack link, the ``files:read`` scope
missing, a failed download) becomes an :class:`~bot.core.requests.ImageAttachment` with ``error`` set: the
core answers it after dropping a redelivered event, so a retried message is never answered twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bot.core.frontend_api import ImageLimits
from bot.core.images import format_size
from bot.core.requests import ImageAttachment

__all__ = ["FILES_READ", "SlackFiles", "slack_hosted"]

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
FILES_READ = (
    "Slack sent a login page instead of {name}: this app is missing the `files:read` scope. "
    "Ask a workspace admin to add it (OAuth & Permissions) and reinstall the app."
)


class _Refused(Exception):
    def __init__(self, user_message: str) -> None:
        super().__init__(user_message)
        self.user_message = user_message


def slack_hosted(url: str, api_url: str) -> bool:
    """The bot token is sent only to Slack's own file hosts (or the configured API host)."""
    target, api = urlsplit(url), urlsplit(api_url)
    if (target.scheme, target.netloc) == (api.scheme, api.netloc):
        return True
    host = target.hostname or ""
    slack_host = host in ("slack.com", "slack-gov.com") or host.endswith((".slack.com", ".slack-gov.com"))
    return target.scheme == "https" and slack_host


class SlackFiles:
    """Downloads a message's ``files[]``: ``limits`` (read per message) come from the core, ``max_bytes``
    (``[slack] max_image_bytes``, 0 = the core's limit) may lower the size cap."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        token: str,
        api_url: str,
        limits: Callable[[], ImageLimits],
        max_bytes: int = 0,
    ) -> None:
        self.http, self.api_url, self.limits, self.max_bytes = http, api_url, limits, max_bytes
        self._headers = {"Authorization": f"Bearer {token}"}

    async def download(self, files: list[dict[str, Any]]) -> tuple[ImageAttachment, ...]:
        """The pictures, or — at the first one that cannot be fetched — that one alone, with its ``error``."""
        limits = self.limits()
        if len(files) > limits.max_per_message:
            # Nothing is downloaded: the core refuses the message for the count of pictures alone.
            return tuple(ImageAttachment(b"", filename=_name(f), mime=f.get("mimetype") or "") for f in files)
        cap = self.max_bytes or limits.max_bytes
        pictures = []
        for file in files:
            try:
                pictures.append(await self._download_one(file, cap, limits))
            except _Refused as exc:
                name, mime = _name(file), file.get("mimetype") or ""
                return (ImageAttachment(b"", filename=name, mime=mime, error=exc.user_message),)
        return tuple(pictures)

    async def _download_one(self, file: dict[str, Any], cap: int, limits: ImageLimits) -> ImageAttachment:
        name, mime = _name(file), file.get("mimetype") or ""
        too_big = f"{name} is larger than {format_size(cap)}, the most I accept; please send a smaller picture."
        if mime and not mime.startswith("image/"):
            raise _Refused(f"{name} is not a picture ({mime}); I read {limits.formats_text('and')}.")
        if int(file.get("size") or 0) > cap:
            raise _Refused(too_big)
        url = file.get("url_private_download") or file.get("url_private")
        if not url or not slack_hosted(url, self.api_url):
            raise _Refused(f"I can't open {name}: Slack did not share a download link. Please upload it here.")
        try:
            async with self.http.get(url, headers=self._headers) as response:
                if response.status != 200:
                    raise _Refused(f"Slack answered HTTP {response.status} for {name}; please upload it again.")
                if response.content_type == "text/html":
                    raise _Refused(FILES_READ.format(name=name))
                data = bytearray()
                async for chunk in response.content.iter_chunked(CHUNK):
                    data += chunk
                    if len(data) > cap:
                        raise _Refused(too_big)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("downloading a Slack file failed: %s", type(exc).__name__)
            raise _Refused(f"I couldn't download {name} from Slack; please try again.") from None
        return ImageAttachment(bytes(data), filename=name, mime=mime)


def _name(file: dict[str, Any]) -> str:
    return file.get("name") or file.get("title") or "the picture"
