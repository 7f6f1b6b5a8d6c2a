"""Discord's text and message rules: mentions, thread names, the calls every reply makes, and channel replies.

:class:`ChannelReply` is the :class:`~adapters.streaming.EditableMessages` of an answer to a message (a mention,
a DM, a message in a conversation thread).  For a mention in a channel the thread is started on the user's
message when the answer begins (a thread started from a message has the message's id, which is the
conversation's key from the start); where threads are not allowed the answer is a reply to the message.
Notices only the asker should see are replies to the message: Discord has no ephemeral messages outside
interactions.  The answer to ``/ask`` is :class:`~adapters.discord.interaction_reply.InteractionReply`, built on
the helpers here.

Every message the bot sends carries ``allowed_mentions=none``: model text never pings anyone.  Until the answer
begins, Discord's own "typing…" is the placeholder.  Each message keeps ``interval_s`` between
two versions, the final edit included.  Failed calls are logged and reported as ``None``/``False``; discord.py
waits out 429s (``retry_after``) itself.  Files (a ``website`` answer's preview and page) follow the answer.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import aiohttp
import discord

from adapters.discord.settings import MESSAGE_LIMIT
from adapters.streaming import PLACEHOLDER, ReplyFormat
from bot.core.requests import ReplyFile

__all__ = [
    "FAILED",
    "FAILURES",
    "NO_MENTIONS",
    "THREAD_ARCHIVE_MINUTES",
    "ChannelReply",
    "Pacer",
    "VirtualIds",
    "attempt",
    "discord_format",
    "sent_or_none",
    "strip_mentions",
    "thread_name",
    "upload_files",
]

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()
TYPING_MAX_S = 300.0  # renew "typing…" at most this long while an answer has not begun
# a conversation thread hides after a day without messages (Discord allows these four durations)
THREAD_ARCHIVE_MINUTES: Literal[60, 1440, 4320, 10080] = 1440
FAILURES = (discord.DiscordException, aiohttp.ClientError, TimeoutError, OSError, ValueError)


def strip_mentions(text: str, user_id: int | None, role_id: int | None = None) -> str:
    """Drop mentions of this bot (``<@id>``, ``<@!id>``, its managed role ``<@&id>``) from a user's message."""
    if user_id:
        text = re.sub(rf"<@!?{user_id}>", " ", text)
    if role_id:
        text = re.sub(rf"<@&{role_id}>", " ", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def discord_format(limit: int) -> ReplyFormat:
    """Streamed replies in Discord: ``limit`` characters a message, Markdown as the model wrote it."""
    return ReplyFormat(limit=limit, cost=len, warning="⚠️ ")


def thread_name(text: str, fallback: str = "Picture question") -> str:
    """A thread title from the question: one line, at most 100 characters (Discord's limit)."""
    line = " ".join(text.replace("`", "").split()) or fallback
    return line if len(line) <= 100 else line[:99] + "…"


FAILED: Any = object()  # what a failed call gives (a successful delete gives None)


async def attempt(what: str, call: Awaitable[Any]) -> Any:
    """Await one Discord call; :data:`FAILED` when it failed (logged, never the token or the text)."""
    try:
        return await call
    except discord.HTTPException as exc:
        log.warning("Discord %s failed: HTTP %s (code %s)", what, exc.status, exc.code)
    except FAILURES as exc:
        log.warning("Discord %s failed: %s", what, type(exc).__name__)
    return FAILED


async def sent_or_none(what: str, call: Awaitable[Any]) -> Any:
    """A call that gives a message: the message, or ``None`` when it failed."""
    result = await attempt(what, call)
    return None if result is FAILED else result


def _files(files: Sequence[ReplyFile]) -> tuple[list[discord.File], str | None]:
    """discord.py files and their caption (the titles), for one message."""
    titles = " · ".join(f.title for f in files if f.title) or None
    return [discord.File(io.BytesIO(f.data), filename=f.filename, description=f.title or None) for f in files], titles


async def upload_files(
    what: str, send: Callable[..., Awaitable[Any]], files: Sequence[ReplyFile], limit: int
) -> str | None:
    """Send ``files`` with ``send``; ``None`` when done, else a one-line note for the asker."""
    names = ", ".join(f.filename for f in files)
    too_big = [f.filename for f in files if len(f.data) > limit]
    if too_big:
        return f"I couldn't attach {', '.join(too_big)}: Discord takes files up to {limit // (1024 * 1024)} MiB here."
    attachments, caption = _files(files)
    try:
        await send(content=caption, files=attachments, allowed_mentions=NO_MENTIONS)
    except discord.Forbidden:
        log.warning("Discord %s failed: missing permission", what)
        return f"I couldn't attach {names}: I lack the Attach Files permission in this channel."
    except discord.HTTPException as exc:
        log.warning("Discord %s failed: HTTP %s (code %s)", what, exc.status, exc.code)
        return f"I couldn't attach {names} here (Discord answered HTTP {exc.status})."
    except FAILURES as exc:
        log.warning("Discord %s failed: %s", what, type(exc).__name__)
        return f"I couldn't attach {names} here: the upload to Discord failed."
    return None


class VirtualIds:
    """Message ids handed to :class:`StreamedReply` ("m0", "m1" …), mapped to the real messages behind them."""

    def __init__(self) -> None:
        self._ids = itertools.count()

    def new(self) -> str:
        return f"m{next(self._ids)}"


class Pacer:
    """At least ``interval_s`` between two versions of one message (its creation counts), final edits included."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[int, float] = {}

    def mark(self, message_id: int) -> None:
        self._last[message_id] = time.monotonic()

    async def wait(self, message_id: int) -> None:
        last = self._last.get(message_id)
        if last is not None and (wait := last + self.interval_s - time.monotonic()) > 0:
            await asyncio.sleep(wait)


class ChannelReply:
    """The bot's messages answering one user message.

    ``new_thread``: start a thread on ``source`` for the answer (a mention in a channel).  ``answering()`` says
    whether the core is answering (a model answer, not a notice): only then is a thread started.
    """

    def __init__(
        self,
        source: discord.Message,
        *,
        new_thread: bool,
        name: str,
        answering: Callable[[], bool],
        on_thread: Callable[[discord.Thread, int], None] = lambda _thread, _source: None,
        interval_s: float = 1.0,
    ) -> None:
        self.source, self.new_thread, self.name, self.answering = source, new_thread, name, answering
        self.on_thread = on_thread
        self._pace = Pacer(interval_s)
        self.place: discord.abc.Messageable | None = None
        self.thread: discord.Thread | None = None
        self._reference = True  # the first message in the user's own channel replies to it
        self._typing: asyncio.Future[None] | None = None
        self._messages: dict[str, discord.Message | None] = {}
        self._ids = VirtualIds()

    async def _ensure_place(self) -> discord.abc.Messageable:
        if self.place is None:
            if self.new_thread and self.answering():
                self.thread = await sent_or_none(
                    "starting a thread",
                    self.source.create_thread(name=self.name, auto_archive_duration=THREAD_ARCHIVE_MINUTES),
                )
                if self.thread is None:
                    log.warning("Discord: no thread in channel %s (grant Create Public Threads); replying instead",
                                self.source.channel.id)  # fmt: skip
                else:
                    self.on_thread(self.thread, self.source.id)
            if self.thread is not None:
                self.place, self._reference = self.thread, False
            else:
                self.place = self.source.channel
        return self.place

    async def _keep_typing(self, channel: Any) -> None:
        """ "typing…" lasts 10 s on Discord: renew it until the first message (at most ``TYPING_MAX_S``)."""
        deadline = time.monotonic() + TYPING_MAX_S
        while time.monotonic() < deadline:
            await attempt("typing", channel.typing())
            await asyncio.sleep(8.0)

    def _stop_typing(self) -> None:
        if self._typing is not None:
            self._typing.cancel()

    async def _send(self, text: str) -> discord.Message | None:
        self._stop_typing()
        place = await self._ensure_place()
        if self._reference:
            self._reference = False
            reference = self.source.to_reference(fail_if_not_exists=False)
            sent = await sent_or_none(
                "sending a reply", place.send(text, reference=reference, allowed_mentions=NO_MENTIONS)
            )
        else:
            sent = await sent_or_none("sending a message", place.send(text, allowed_mentions=NO_MENTIONS))
        if sent is not None:
            self._pace.mark(sent.id)
        return sent

    async def post(self, text: str) -> str | None:
        message_id = self._ids.new()
        if text == PLACEHOLDER:
            # Discord's own "typing…" is the placeholder: the message is created with the first text, which
            # spares an edit (and, before a notice, a thread).
            if self._typing is None:
                self._typing = asyncio.ensure_future(self._keep_typing(self.thread or self.source.channel))
            self._messages[message_id] = None
            return message_id
        message = await self._send(text)
        if message is None:
            return None
        self._messages[message_id] = message
        return message_id

    async def update(self, message_id: str, text: str) -> bool:
        message = self._messages.get(message_id)
        if message is None:
            sent = await self._send(text)
            self._messages[message_id] = sent
            return sent is not None
        await self._pace.wait(message.id)
        edited = await sent_or_none("editing a message", message.edit(content=text, allowed_mentions=NO_MENTIONS))
        if edited is None:
            return False
        self._pace.mark(message.id)
        self._messages[message_id] = edited
        return True

    async def delete(self, message_id: str) -> bool:
        message = self._messages.pop(message_id, None)
        if message is None:
            self._stop_typing()
            return True
        return await attempt("deleting a message", message.delete()) is not FAILED

    async def upload(self, files: Sequence[ReplyFile]) -> str | None:
        """The files in one message where the answer is (the thread, or the channel)."""
        place = await self._ensure_place()
        guild = getattr(self.source, "guild", None)
        limit = guild.filesize_limit if guild is not None else discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES
        return await upload_files("uploading files", place.send, files, limit)

    async def post_ephemeral(self, text: str) -> bool:
        self._stop_typing()
        text = text[:MESSAGE_LIMIT]
        reference = self.source.to_reference(fail_if_not_exists=False)
        sent = await sent_or_none(
            "replying", self.source.channel.send(text, reference=reference, allowed_mentions=NO_MENTIONS)
        )
        return sent is not None
