"""Pictures attached to Slack messages: checked, then downloaded with the bot token from Slack's own hosts.

The policy (the size cap that can only lower the core's, the checks before a download, the refusal) is
the one every chat platform shares, :mod:`adapters.downloads`; this module adds what is Slack's own: the
``files[]`` entries, the bot token sent only to Slack's hosts, and the login page Slack answers without
the ``files:read`` scope.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from adapters.downloads import Declared, PictureDownloads, Refused, read_capped
from bot.core.frontend_api import ImageLimits

__all__ = ["FILES_READ", "SlackFiles", "slack_hosted"]

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
FILES_READ = (
    "Slack sent a login page instead of {name}: this app is missing the `files:read` scope. "
    "Ask a workspace admin to add it (OAuth & Permissions) and reinstall the app."
)


def slack_hosted(url: str, api_url: str) -> bool:
    """The bot token is sent only to Slack's own file hosts (or the configured API host)."""
    target, api = urlsplit(url), urlsplit(api_url)
    if (target.scheme, target.netloc) == (api.scheme, api.netloc):
        return True
    host = target.hostname or ""
    slack_host = host in ("slack.com", "slack-gov.com") or host.endswith((".slack.com", ".slack-gov.com"))
    return target.scheme == "https" and slack_host


class SlackFiles(PictureDownloads[dict[str, Any]]):
    """Downloads a message's ``files[]``: ``limits`` (read per message) come from the core, ``max_bytes``
    (``[slack] max_image_bytes``, 0 = the core's limit) may lower the size cap, never raise it."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        token: str,
        api_url: str,
        limits: Callable[[], ImageLimits],
        max_bytes: int = 0,
    ) -> None:
        super().__init__(limits, max_bytes)
        self.http, self.api_url = http, api_url
        self._headers = {"Authorization": f"Bearer {token}"}

    def declared(self, item: dict[str, Any]) -> Declared:
        name = item.get("name") or item.get("title") or "the picture"
        return Declared(name, item.get("mimetype") or "", int(item.get("size") or 0))

    async def fetch(self, item: dict[str, Any], file: Declared, cap: int) -> bytes:
        url = item.get("url_private_download") or item.get("url_private")
        if not url or not slack_hosted(url, self.api_url):
            raise Refused(f"I can't open {file.name}: Slack did not share a download link. Please upload it here.")
        try:
            async with self.http.get(url, headers=self._headers) as response:
                if response.status != 200:
                    raise Refused(f"Slack answered HTTP {response.status} for {file.name}; please upload it again.")
                if response.content_type == "text/html":
                    raise Refused(FILES_READ.format(name=file.name))
                return await read_capped(response.content.iter_chunked(CHUNK), cap, file.name)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("downloading a Slack file failed: %s", type(exc).__name__)
            raise Refused(f"I couldn't download {file.name} from Slack; please try again.") from None
