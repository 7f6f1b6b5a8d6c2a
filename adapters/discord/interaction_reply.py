"""Discord's answer to a deferred interaction (``/ask``, ``/reset``): :class:`InteractionReply`.

An :class:`~adapters.streaming.EditableMessages` for :class:`~adapters.streaming.StreamedReply`: the deferred
original response is edited with the interaction token, longer answers continue as follow-up messages, the
thread is started on the original response when the answer begins.  The token lives 15 minutes: shortly before
it expires the response points to where the answer goes on, and the rest continues as normal channel messages
(bot token) — in the thread when there is one.  Notices go to the asker alone (ephemeral follow-ups).  The
rules every Discord reply follows (no mentions, the pace between edits, failed calls logged) are in
:mod:`adapters.discord.messages`.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import discord

from adapters.discord.messages import (
    FAILED,
    FAILURES,
    NO_MENTIONS,
    THREAD_ARCHIVE_MINUTES,
    Pacer,
    VirtualIds,
    attempt,
    sent_or_none,
    upload_files,
)
from adapters.discord.settings import MESSAGE_LIMIT
from adapters.streaming import PLACEHOLDER
from bot.core.requests import ReplyFile

__all__ = ["TOKEN_LIFETIME", "InteractionReply"]

log = logging.getLogger(__name__)

TOKEN_LIFETIME = datetime.timedelta(minutes=15)  # an interaction token's life
_TOKEN_GONE = (10015, 50027)  # Unknown Webhook, Invalid Webhook Token


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
        self._pace = Pacer(interval_s)  # the deferred response shows no text yet: its first edit need not wait
        self.thread: discord.Thread | None = None
        self.original = "deferred"  # deferred | shown | deleted | handed-over
        self.original_vid: str | None = None
        self._thread_tried = False
        self._messages: dict[str, tuple[str, Any]] = {}  # vid -> ("original" | "followup" | "channel", message)
        self._ids = VirtualIds()

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
        except FAILURES as exc:
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
        self.thread = await sent_or_none(
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
        return await self._send_in_channel(vid, text)

    async def _send_in_channel(self, vid: str, text: str) -> bool:
        """``text`` as a bot-token message where the answer is (the thread, else the channel), kept as ``vid``."""
        sent = await sent_or_none("sending a message", self.place.send(text, allowed_mentions=NO_MENTIONS))
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
        return vid if await self._send_in_channel(vid, text) else None

    async def update(self, message_id: str, text: str) -> bool:
        if message_id not in self._messages:
            return False
        return await self._show(message_id, text)

    async def _show(self, vid: str, text: str) -> bool:
        kind, message = self._messages[vid]
        key = self.original_id if kind == "original" else message.id
        await self._pace.wait(key)
        if kind == "channel":
            edited = await sent_or_none("editing a message", message.edit(content=text, allowed_mentions=NO_MENTIONS))
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
            return await attempt("deleting a message", message.delete()) is not FAILED
        if kind == "original" and self.original in ("deferred", "shown"):
            return await self._delete_original()
        if kind == "followup" and self.token_alive():
            done = await attempt("deleting a follow-up", self.interaction.followup.delete_message(message.id))
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
        return await sent_or_none("sending a notice", self.place.send(text, allowed_mentions=NO_MENTIONS)) is not None

    async def upload(self, files: Sequence[ReplyFile]) -> str | None:
        """The files as a follow-up of the response (or, once the token is spent, in the thread/channel)."""
        limit = getattr(self.interaction, "filesize_limit", 0) or discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES
        if self.token_alive():

            async def followup(**kwargs: Any) -> Any:
                return await self.interaction.followup.send(wait=True, **kwargs)

            return await upload_files("uploading files", followup, files, limit)
        return await upload_files("uploading files", self.place.send, files, limit)

    async def finish(self) -> None:
        """After the reply: a response still "thinking…" (the core answered nothing) is removed."""
        if self.original == "deferred" and self.original_vid is None:
            await self._delete_original()
