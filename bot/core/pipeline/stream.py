"""The stream step, the last: the answer streamed from the backend as :class:`~bot.core.requests.Delta`
values (mentions and CRLF split over tokens never let out), what was streamed kept in ``ctx.streamed`` for the
store step, and stored about every second while it streams (:class:`PartialSaver`), so a kill -9 keeps most
of it.  A backend error becomes the user's message here, by type (:func:`engine_error`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator

from bot.core.errors import BotError, BusyError, ImageError, ModelUnavailable, UserInputError
from bot.core.pipeline.chain import Context, Handler, Parts, log
from bot.core.requests import Delta, ReplyEvent
from bot.core.sanitize import StreamSanitizer, clean_text, sanitize_output
from model.engine.contract import Busy, FinalEvent, RequestFailed, RequestRejected, TokenEvent
from storage import Database, is_unavailable

__all__ = ["PartialSaver", "Stream", "engine_error", "stored_error", "streamed_text"]


def streamed_text(parts: list[str]) -> str:
    """The text of the tokens streamed so far, cleaned as a finished answer would be."""
    return sanitize_output("".join(parts)).strip()


class PartialSaver:
    """Stores an answer's streamed text every ``every_s`` seconds while it streams, so a crash (kill -9)
    keeps most of what the user saw: in the background, at most one write in flight, so a slow database
    delays no token.  Best effort: a failed write is logged once and the answer goes on."""

    def __init__(self, db: Database, turn_id: int, every_s: float) -> None:
        self._db, self._turn_id, self._every_s = db, turn_id, every_s
        self._due = time.monotonic() + every_s
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    def offer(self, parts: list[str]) -> None:
        """Called after each token: starts a write when one is due and none is running."""
        now = time.monotonic()
        if now < self._due or (self._task is not None and not self._task.done()):
            return
        self._due = now + self._every_s
        self._task = asyncio.ensure_future(self._write(streamed_text(parts)))

    async def settle(self) -> None:
        """Wait for a write still in flight (the answer is finishing normally)."""
        if self._task is not None:
            await self._task

    async def _write(self, text: str) -> None:
        try:
            await self._db.save_partial(self._turn_id, text)
        except Exception as exc:
            if not self._warned:
                self._warned = True
                log.warning("turn %s: could not store the text streamed so far: %r", self._turn_id, exc)


def stored_error(exc: BaseException) -> str:
    """What the ``error`` column keeps of an exception: one cleaned, bounded text (details are in the log)."""
    return clean_text(repr(exc))[:2000]


def engine_error(exc: Exception, conversation_id: int) -> BotError:
    """What the user is told for a backend error: decided here, by type, never by the backend."""
    if isinstance(exc, Busy):
        return BusyError(exc.retry_after_s)
    if isinstance(exc, RequestRejected) and exc.reason == "image":
        which = f"picture {exc.image_index + 1}" if exc.image_index is not None else "a picture"
        log.info("conversation %s: %s", conversation_id, exc)
        return ImageError(f"I couldn't read {which} of this thread as an image. Please send it again.")
    if isinstance(exc, RequestRejected) and exc.reason == "too_large":
        log.info("conversation %s: %s", conversation_id, exc)
        return UserInputError(
            "This thread is too long for the model now. Say reset to start over (you can post the picture again)."
        )
    if isinstance(exc, RequestFailed | RequestRejected):
        log.error("backend failed for conversation %s: %s", conversation_id, exc)
    else:
        log.error("backend failed for conversation %s", conversation_id, exc_info=exc)
    return ModelUnavailable(str(exc))


class Stream:
    """Streams the answer of ``ctx.turns``/``ctx.images`` from the backend into ``ctx.streamed``; the answer
    turn is marked ``streaming`` at the first token.  Closed early or failed, it closes the backend's stream
    now (not when the garbage collector finds it), which cancels the backend's request."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    async def __call__(self, ctx: Context, call_next: Handler) -> AsyncGenerator[ReplyEvent, None]:
        streamed, turn_id = ctx.streamed, ctx.answer_turn
        assert turn_id is not None and ctx.conversation is not None
        partial = PartialSaver(self.parts.db, turn_id, self.parts.timing.PARTIAL_SAVE_S)
        stream: AsyncIterator[TokenEvent | FinalEvent] | None = None
        done = False
        try:
            stream = self.parts.backend.stream(
                turns=ctx.turns, images=ctx.images, conversation_id=str(ctx.conversation.id),
                user=ctx.request.user, options=ctx.options,
            )  # fmt: skip
            first, shown = True, StreamSanitizer()  # a mention or CRLF split over tokens is never let out
            async for event in stream:
                if isinstance(event, FinalEvent):
                    streamed.final = event
                    continue
                if not isinstance(event, TokenEvent):
                    raise TypeError(f"the backend streamed a {type(event).__name__}, not a token or final event")
                streamed.generated += 1
                if first:
                    first = False
                    await self._mark_streaming(turn_id)
                if event.text:
                    streamed.parts.append(event.text)
                    partial.offer(streamed.parts)
                    if safe := shown.feed(event.text):
                        yield Delta(safe)
            if rest := shown.flush():
                yield Delta(rest)
            done = True
        except Exception as exc:
            streamed.error = stored_error(exc)
            raise engine_error(exc, ctx.conversation.id) from exc
        finally:
            if not done and (close := getattr(stream, "aclose", None)) is not None:
                try:  # now, not when the garbage collector finds it: this cancels the backend's request
                    await asyncio.shield(close())
                except Exception as exc:
                    log.warning("turn %s: closing the backend stream failed: %r", turn_id, exc)
        await partial.settle()  # its write finishes before the final one (which it could not undo anyway)

    async def _mark_streaming(self, turn_id: int) -> None:
        """Best effort: a blip here must not end an answer that the final write may still store."""
        try:
            await self.parts.db.finish_turn(turn_id, status="streaming")
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            log.warning("turn %s: could not mark the answer streaming: %r", turn_id, exc)
