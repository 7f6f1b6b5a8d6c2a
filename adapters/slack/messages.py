"""Slack's text and message rules: mrkdwn escaping, mention stripping, and the messages of one thread.

:class:`SlackThread` is Slack's :class:`~adapters.streaming.EditableMessages` (``chat.postMessage`` /
``chat.update`` / ``chat.delete`` / ``chat.postEphemeral``, files with ``files_upload_v2``, through an
``AsyncWebClient`` that already waits out 429s); :func:`slack_format` gives
:class:`~adapters.streaming.StreamedReply` Slack's escape cost.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError, SlackClientError

from adapters.streaming import INTERRUPTED, PLACEHOLDER, SUFFIX, ReplyFormat
from bot.core.grounding import bold_spans
from bot.core.requests import ReplyFile

__all__ = [
    "INTERRUPTED",
    "PLACEHOLDER",
    "SUFFIX",
    "SlackThread",
    "escape_mrkdwn",
    "escaped_len",
    "missing_files_write",
    "no_fence",
    "slack_format",
    "strip_mention",
    "to_mrkdwn",
    "unescape_mrkdwn",
]

log = logging.getLogger(__name__)


def escape_mrkdwn(text: str) -> str:
    """Slack's three control characters (``&``, ``<``, ``>``): model text must never become a link or mention."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def unescape_mrkdwn(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def escaped_len(text: str) -> int:
    """Length of ``text`` once escaped — what Slack counts against its message limit."""
    return len(text) + 4 * text.count("&") + 3 * (text.count("<") + text.count(">"))


def no_fence(text: str) -> str:
    """Escaped, with any triple backtick defused, for quoting a prompt inside a one-line help entry."""
    return escape_mrkdwn(text).replace("```", "`\u200b`\u200b`")


def strip_mention(text: str, bot_user_id: str | None) -> str:
    """Drop ``<@BOT>`` / ``<@BOT|name>`` mentions of this bot and Slack's escaping from a user's message."""
    if bot_user_id:
        text = re.sub(rf"<@{re.escape(bot_user_id)}(?:\|[^>]*)?>:?", " ", text)
    return re.sub(r"[ \t]{2,}", " ", unescape_mrkdwn(text)).strip()


def to_mrkdwn(text: str) -> str:
    """Plain model text → Slack mrkdwn: escaped (:func:`escape_mrkdwn`), and Markdown bold — the core's
    ``**phrase**`` for an answer's boxed phrases — as Slack's ``*phrase*`` (code left as written).  Never
    longer than :func:`escaped_len` says, so a chunk split to that cost still fits the message limit."""
    return "".join(f"*{part}*" if bold else part for part, bold in bold_spans(escape_mrkdwn(text)))


def slack_format(limit: int) -> ReplyFormat:
    """Streamed replies in Slack: ``limit`` escaped characters a message, text in mrkdwn (:func:`to_mrkdwn`)."""
    return ReplyFormat(limit=limit, cost=escaped_len, escape=to_mrkdwn, warning=":warning: ")


class SlackThread:
    """The bot's messages in one thread, for one asker (ephemeral notices go to ``user`` alone).

    ``in_thread``: the asker wrote inside the thread, so an ephemeral notice is shown there; a top-level
    message gets its notice in the channel.
    """

    def __init__(self, client: Any, channel: str, thread: str, user: str, in_thread: bool) -> None:
        self.client, self.channel, self.thread, self.user, self.in_thread = client, channel, thread, user, in_thread

    async def post(self, text: str) -> str | None:
        response = await self._call(
            "chat_postMessage", channel=self.channel, thread_ts=self.thread, text=text, unfurl_links=False,
            unfurl_media=False,
        )  # fmt: skip
        return None if response is None else response["ts"]

    async def update(self, message_id: str, text: str) -> bool:
        return await self._call("chat_update", channel=self.channel, ts=message_id, text=text) is not None

    async def delete(self, message_id: str) -> bool:
        return await self._call("chat_delete", channel=self.channel, ts=message_id) is not None

    async def post_ephemeral(self, text: str) -> bool:
        thread = {"thread_ts": self.thread} if self.in_thread else {}
        response = await self._call("chat_postEphemeral", channel=self.channel, user=self.user, text=text, **thread)
        return response is not None

    async def upload(self, files: Sequence[ReplyFile]) -> str | None:
        """Upload into the thread with ``files_upload_v2`` (needs ``files:write``)."""
        uploads = [{"content": f.data, "filename": f.filename, "title": f.title or f.filename} for f in files]
        try:
            await self.client.files_upload_v2(file_uploads=uploads, channel=self.channel, thread_ts=self.thread)
        except SlackApiError as exc:
            error = exc.response.get("error")
            log.warning("files_upload_v2 failed in %s: %s", self.channel, error)
            if error == "missing_scope":
                return missing_files_write(files)
            return f"I couldn't attach {_names(files)} here (Slack said: {error})."
        except (SlackClientError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("files_upload_v2 failed in %s: %s", self.channel, type(exc).__name__)
            return f"I couldn't attach {_names(files)} here: the upload to Slack failed."
        return None

    async def _call(self, method: str, **kwargs: Any) -> Any:
        """One Web API call (429s already retried by the client); ``None`` when it failed, logged."""
        try:
            return await getattr(self.client, method)(**kwargs)
        except SlackApiError as exc:
            log.warning("%s failed in %s: %s", method, self.channel, exc.response.get("error"))
        except (SlackClientError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("%s failed in %s: %s", method, self.channel, type(exc).__name__)
        return None


def missing_files_write(files: Sequence[ReplyFile]) -> str:
    """The note for an app without ``files:write``, naming what could not be attached (the boxes on the
    user's picture, a website preview and its page …) by each file's title and name."""
    return (
        f"I couldn't attach {_described(files)}: this Slack app lacks the files:write scope. "
        "Ask a workspace admin to add it (OAuth & Permissions → Bot Token Scopes) and reinstall the app."
    )


def _described(files: Sequence[ReplyFile]) -> str:
    named = [f"“{f.title}” ({f.filename})" if f.title else f.filename for f in files]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def _names(files: Sequence[ReplyFile]) -> str:
    return ", ".join(f.filename for f in files)
