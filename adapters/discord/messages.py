"""Discord's text and message rules: mentions, and the bot's messages of one reply.

Two :class:`~adapters.streaming.EditableMessages` for :class:`~adapters.streaming.StreamedReply`:

* :class:`ChannelReply` — an answer to a message (a mention, a DM, a message in a conversation thread).  For a
  mention in a channel the thread is started on the user's message when the answer begins (a thread started
  from a message has the message's id, which is the conversation's key from the start); where threads are not
  allowed the answer is a reply to the message.  Notices only the asker should see are replies to the
  message: Discord has no ephemeral messages outside interactions.
* :class:`InteractionReply` — an answer to ``/ask`` (or ``/reset``): the deferred original response is edited
  with the interaction token, longer answers continue as follow-up messages, the thread is started on the
  original response when the answer begins.  The token lives 15 minutes: shortly before it expires the
  response points to where the answer goes on, and the rest continues as normal channel messages (bot
  token) — in the thread when there is one.  Notices go to the asker alone (ephemeral follow-ups).

Every message the bot sends carries ``allowed_mentions=none``: model text never pings anyone.  Until the answer
begins, Discord's own "typing…" / "thinking…" is the placeholder.  Each message keeps ``interval_s`` between
two versions, the final edit included.  Failed calls are logged and reported as ``None``/``False``; discord.py
waits out 429s (``retry_after``) itself.  Files (a ``website`` answer's preview and page) follow the answer.
"""

from __future__ import annotations

import asyncio
import datetime
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
    "NO_MENTIONS",
    "TOKEN_LIFETIME",
    "ChannelReply",
    "InteractionReply",
    "discord_format",
    "strip_mentions",
    "thread_name",
]

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()
TOKEN_LIFETIME = datetime.timedelta(minutes=15)  # an interaction token's life
TYPING_MAX_S = 300.0  # renew "typing…" at most this long while an answer has not begun
# a conversation thread hides after a day without messages (Discord allows these four durations)
THREAD_ARCHIVE_MINUTES: Literal[60, 1440, 4320, 10080] = 1440
_FAILURES = (discord.DiscordException, aiohttp.ClientError, TimeoutError, OSError, ValueError)
_TOKEN_GONE = (10015, 50027)  # Unknown Webhook, Invalid Webhook Token


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


async def _call(what: str, call: Awaitable[Any]) -> Any:
    """Await one Discord call; :data:`FAILED` when it failed (logged, never the token or the text)."""
    try:
        return await call
    except discord.HTTPException as exc:
        log.warning("Discord %s failed: HTTP %s (code %s)", what, exc.status, exc.code)
    except _FAILURES as exc:
        log.warning("Discord %s failed: %s", what, type(exc).__name__)
    return FAILED


async def _sent(what: str, call: Awaitable[Any]) -> Any:
    """A call that gives a message: the message, or ``None`` when it failed."""
    result = await _call(what, call)
    return None if result is FAILED else result


def _files(files: Sequence[ReplyFile]) -> tuple[list[discord.File], str | None]:
    """discord.py files and their caption (the titles), for one message."""
    titles = " · ".join(f.title for f in files if f.title) or None
    return [discord.File(io.BytesIO(f.data), filename=f.filename, description=f.title or None) for f in files], titles


async def _upload(what: str, send: Callable[..., Awaitable[Any]], files: Sequence[ReplyFile], limit: int) -> str | None:
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
    except _FAILURES as exc:
        log.warning("Discord %s failed: %s", what, type(exc).__name__)
        return f"I couldn't attach {names} here: the upload to Discord failed."
    return None


class _Virtual:
    """Message ids handed to :class:`StreamedReply` ("m0", "m1" …), mapped to the real messages behind them."""

    def __init__(self) -> None:
        self._ids = itertools.count()

    def new(self) -> str:
        return f"m{next(self._ids)}"


class _Pacer:
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
        self._pace = _Pacer(interval_s)
        self.place: discord.abc.Messageable | None = None
        self.thread: discord.Thread | None = None
        self._reference = True  # the first message in the user's own channel replies to it
        self._typing: asyncio.Future[None] | None = None
        self._messages: dict[str, discord.Message | None] = {}
        self._ids = _Virtual()

    async def _ensure_place(self) -> discord.abc.Messageable:
        if self.place is None:
            if self.new_thread and self.answering():
                self.thread = await _sent(
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
            await _call("typing", channel.typing())
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
            sent = await _sent("sending a reply", place.send(text, reference=reference, allowed_mentions=NO_MENTIONS))
        else:
            sent = await _sent("sending a message", place.send(text, allowed_mentions=NO_MENTIONS))
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
        edited = await _sent("editing a message", message.edit(content=text, allowed_mentions=NO_MENTIONS))
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
        return await _call("deleting a message", message.delete()) is not FAILED

    async def upload(self, files: Sequence[ReplyFile]) -> str | None:
        """The files in one message where the answer is (the thread, or the channel)."""
        place = await self._ensure_place()
        guild = getattr(self.source, "guild", None)
        limit = guild.filesize_limit if guild is not None else discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES
        return await _upload("uploading files", place.send, files, limit)

    async def post_ephemeral(self, text: str) -> bool:
        self._stop_typing()
        text = text[:MESSAGE_LIMIT]
        reference = self.source.to_reference(fail_if_not_exists=False)
        sent = await _sent(
            "replying", self.source.channel.send(text, reference=reference, allowed_mentions=NO_MENTIONS)
        )
        return sent is not None


class InteractionReply:
    """The bot's messages answering one deferred interaction (``/ask``, ``/reset``).

    ``original_id``: the deferred response's message id.  ``channel``: where the answer continues once the
    token is (nearly) spent — the interaction's channel, or the thread started on the response.
    ``new_thread``: start a thread on the response when the answer begins.  ``expires``: when the token dies
    (15 minutes after the interaction); from ``margin`` before it on, no interaction call is made.
    """

    HANDOVER = "_The answer continues {where}._"

    def __init__(
        self,
        interaction: discord.Interaction,
        original_id: int,
        *,
        channel: discord.abc.Messageable,
        new_thread: bool,
        name: str,
        answering: Callable[[], bool],
        expires: datetime.datetime,
        margin: datetime.timedelta = datetime.timedelta(seconds=60),
        on_thread: Callable[[discord.Thread, int], None] = lambda _thread, _source: None,
        interval_s: float = 1.0,
    ) -> None:
        self.interaction, self.original_id, self.channel = interaction, original_id, channel
        self.new_thread, self.name, self.answering = new_thread, name, answering
        self.expires, self.margin, self.on_thread = expires, margin, on_thread
        self._pace = _Pacer(interval_s)  # the deferred response shows no text yet: its first edit need not wait
        self.thread: discord.Thread | None = None
        self.original = "deferred"  # deferred | shown | deleted | handed-over
        self.original_vid: str | None = None
        self._thread_tried = False
        self._messages: dict[str, tuple[str, Any]] = {}  # vid -> ("original" | "followup" | "channel", message)
        self._ids = _Virtual()

    # ------------------------------------------------------------------ token

    def token_alive(self) -> bool:
        return discord.utils.utcnow() < self.expires - self.margin

    def _token_gone(self, exc: BaseException) -> bool:
        if isinstance(exc, discord.HTTPException) and (exc.code in _TOKEN_GONE or exc.status == 401):
            return True
        return discord.utils.utcnow() >= self.expires

    async def _interaction_call(self, what: str, call: Awaitable[Any]) -> tuple[bool, Any]:
        """(whether the token still works, the result or :data:`FAILED`)."""
        try:
            return True, await call
        except discord.HTTPException as exc:
            if self._token_gone(exc):
                log.info("Discord interaction token spent during %s: continuing with channel messages", what)
                return False, FAILED
            log.warning("Discord %s failed: HTTP %s (code %s)", what, exc.status, exc.code)
        except _FAILURES as exc:
            log.warning("Discord %s failed: %s", what, type(exc).__name__)
        return True, FAILED

    # ------------------------------------------------------------------ places

    async def _maybe_thread(self) -> None:
        """Start the thread on the response once the answer begins (never for a notice or a refusal)."""
        if not self.new_thread or self._thread_tried or not self.answering():
            return
        self._thread_tried = True
        original = self._partial(self.original_id)
        if original is None:
            return
        self.thread = await _sent(
            "starting a thread", original.create_thread(name=self.name, auto_archive_duration=THREAD_ARCHIVE_MINUTES)
        )
        if self.thread is None:
            log.warning("Discord: no thread on the /ask response in channel %s (grant Create Public Threads)",
                        getattr(self.channel, "id", "?"))  # fmt: skip
        else:
            self.on_thread(self.thread, self.original_id)

    def _partial(self, message_id: int) -> discord.PartialMessage | None:
        try:
            return self.channel.get_partial_message(message_id)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            return None

    @property
    def place(self) -> discord.abc.Messageable:
        return self.thread or self.channel

    async def _handover(self, vid: str, kind: str, text: str) -> bool:
        """Leave a pointer in the interaction message (while the token lasts) and show ``text`` as a channel message."""
        thread_coming = self.new_thread and not self._thread_tried and self.answering()
        if kind in ("original", "followup") and discord.utils.utcnow() < self.expires:
            note = self.HANDOVER.format(where="in the thread" if self.thread is not None or thread_coming else "below")
            if kind == "original":
                await self._pace.wait(self.original_id)
                await self._interaction_call("pointing the response on", self._edit_original(note))
            else:
                webhook = self._messages[vid][1]
                await self._pace.wait(webhook.id)
                await self._interaction_call("pointing a follow-up on", self._edit_followup(webhook.id, note))
        if kind == "original":
            self.original = "handed-over"
        await self._maybe_thread()
        sent = await _sent("sending a message", self.place.send(text, allowed_mentions=NO_MENTIONS))
        if sent is None:
            return False
        self._pace.mark(sent.id)
        self._messages[vid] = ("channel", sent)
        return True

    def _edit_original(self, text: str) -> Awaitable[Any]:
        return self.interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS)

    def _edit_followup(self, message_id: int, text: str) -> Awaitable[Any]:
        return self.interaction.followup.edit_message(message_id, content=text, allowed_mentions=NO_MENTIONS)

    # ------------------------------------------------------------------ EditableMessages

    async def post(self, text: str) -> str | None:
        vid = self._ids.new()
        if self.original_vid is None and self.original == "deferred":
            self.original_vid = vid
            self._messages[vid] = ("original", None)
            if text == PLACEHOLDER and self.token_alive():
                return vid  # the deferred response already shows Discord's own "thinking…"
            return vid if await self._show(vid, text) else None
        if self.token_alive():
            alive, sent = await self._interaction_call(
                "sending a follow-up",
                self.interaction.followup.send(text, wait=True, allowed_mentions=NO_MENTIONS),
            )
            if sent is not FAILED:
                self._pace.mark(sent.id)
                self._messages[vid] = ("followup", sent)
                return vid
            if alive:
                return None
        sent = await _sent("sending a message", self.place.send(text, allowed_mentions=NO_MENTIONS))
        if sent is None:
            return None
        self._pace.mark(sent.id)
        self._messages[vid] = ("channel", sent)
        return vid

    async def update(self, message_id: str, text: str) -> bool:
        if message_id not in self._messages:
            return False
        return await self._show(message_id, text)

    async def _show(self, vid: str, text: str) -> bool:
        kind, message = self._messages[vid]
        key = self.original_id if kind == "original" else message.id
        await self._pace.wait(key)
        if kind == "channel":
            edited = await _sent("editing a message", message.edit(content=text, allowed_mentions=NO_MENTIONS))
            if edited is None:
                return False
            self._pace.mark(key)
            self._messages[vid] = ("channel", edited)
            return True
        if self.token_alive():
            if kind == "original":
                alive, edited = await self._interaction_call("editing the response", self._edit_original(text))
            else:
                alive, edited = await self._interaction_call(
                    "editing a follow-up", self._edit_followup(message.id, text)
                )
            if edited is not FAILED:
                self._pace.mark(key)
                if kind == "original":
                    self.original = "shown"
                    await self._maybe_thread()
                return True
            if alive:
                return False
        return await self._handover(vid, kind, text)

    async def delete(self, message_id: str) -> bool:
        kind, message = self._messages.pop(message_id, ("", None))
        if message_id == self.original_vid:
            self.original_vid = None
        if kind == "channel":
            return await _call("deleting a message", message.delete()) is not FAILED
        if kind == "original" and self.original in ("deferred", "shown"):
            return await self._delete_original()
        if kind == "followup" and self.token_alive():
            done = await _call("deleting a follow-up", self.interaction.followup.delete_message(message.id))
            return done is not FAILED
        return False

    async def _delete_original(self) -> bool:
        if not self.token_alive():
            return False
        self.original = "deleted"
        _alive, done = await self._interaction_call(
            "deleting the response", self.interaction.delete_original_response()
        )
        return done is not FAILED

    async def post_ephemeral(self, text: str) -> bool:
        text = text[:MESSAGE_LIMIT]
        if self.original == "deferred":
            await self._delete_original()  # "thinking…" gives way to the notice only the asker sees
        if self.token_alive():
            _alive, sent = await self._interaction_call(
                "sending a notice",
                self.interaction.followup.send(text, ephemeral=True, wait=True, allowed_mentions=NO_MENTIONS),
            )
            if sent is not FAILED:
                return True
        return await _sent("sending a notice", self.place.send(text, allowed_mentions=NO_MENTIONS)) is not None

    async def upload(self, files: Sequence[ReplyFile]) -> str | None:
        """The files as a follow-up of the response (or, once the token is spent, in the thread/channel)."""
        limit = getattr(self.interaction, "filesize_limit", 0) or discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES
        if self.token_alive():

            async def followup(**kwargs: Any) -> Any:
                return await self.interaction.followup.send(wait=True, **kwargs)

            return await _upload("uploading files", followup, files, limit)
        return await _upload("uploading files", self.place.send, files, limit)

    async def finish(self) -> None:
        """After the reply: a response still "thinking…" (the core answered nothing) is removed."""
        if self.original == "deferred" and self.original_vid is None:
            await self._delete_original()
