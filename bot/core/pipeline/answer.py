"""The answer's last two concerns: :class:`Store` writes what the stream step streamed (done, interrupted or
failed, settling the quota reservation in the same write) and yields the answer's ``Final``; :class:`Extras`
adds to that ``Final`` what goes with it (a website preview, the note of a thread cut to fit)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from bot.core.pipeline.chain import Context, Handler, Parts, Streamed, log
from bot.core.pipeline.conversation import was_cut
from bot.core.pipeline.stream import streamed_text
from bot.core.quotas import settlement
from bot.core.requests import Final, ReplyEvent
from bot.core.sanitize import clean_text, sanitize_output
from storage import is_unavailable

__all__ = ["CUT_NOTE", "Extras", "Store"]

CUT_NOTE = (
    "(This thread is now longer than the model reads at once, so it sees only the most recent part: its first "
    "messages and maybe the picture no longer count. Say reset to start over.)"
)
"""Appended to the first answer of a thread whose oldest part was cut to fit ``max_length`` (the reference's
left cut), so the user knows why the answers may forget the beginning."""


class Extras:
    """The answer's ``Final`` with the website preview of the latest picture's answer
    (:class:`~bot.core.previews.WebsitePreviews`) and, once per thread, :data:`CUT_NOTE`."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    async def __call__(self, ctx: Context, call_next: Handler) -> AsyncGenerator[ReplyEvent, None]:
        async with aclosing(call_next(ctx)) as events:
            async for event in events:
                if isinstance(event, Final):
                    picture = ctx.images[-1] if ctx.images else None
                    event = await self.parts.previews.attach(event, picture, ctx.question)
                    if event.meta.get("context_cut") and not ctx.told_cut:  # once per thread: the first cut answer
                        event = dataclasses.replace(event, text=f"{event.text}\n\n{CUT_NOTE}")
                yield event


class Store:
    """Stores the streamed answer and settles the usage reservation in the same write
    (:func:`~bot.core.quotas.settlement`): a done answer with its token counts, written with bounded retries
    (:attr:`~bot.core.pipeline.chain.Timing.STORE_RETRY_DELAYS_S`) in a task that outlives a cancelled
    request, since the user has seen it; an interrupted or failed one keeps the text streamed until then."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    async def __call__(self, ctx: Context, call_next: Handler) -> AsyncGenerator[ReplyEvent, None]:
        ctx.streamed = streamed = Streamed()
        status = "failed"
        try:
            async with aclosing(call_next(ctx)) as events:
                async for event in events:
                    yield event
            status = "done"
        except (asyncio.CancelledError, GeneratorExit):
            status, streamed.error = "interrupted", "cancelled"
            raise
        finally:
            if status != "done":
                await self._unfinished(ctx, status)
        yield await self._finished(ctx)

    async def _unfinished(self, ctx: Context, status: str) -> None:
        """The text streamed so far is kept: the user saw it (a late partial write cannot undo this)."""
        streamed, turn_id = ctx.streamed, ctx.answer_turn
        assert ctx.usage_id is not None and turn_id is not None
        try:
            await asyncio.shield(
                self.parts.db.finish_turn(turn_id, status=status, error=streamed.error, finish_reason=status,
                                          text=streamed_text(streamed.parts),
                                          **settlement(ctx.usage_id, status, streamed=streamed.generated))
            )  # fmt: skip
        except Exception as exc:  # the database is down too: recover() marks it interrupted at the next start
            log.error("turn %s: could not mark the answer %s: %r", turn_id, status, exc)

    async def _finished(self, ctx: Context) -> Final:
        streamed, turn_id, platform = ctx.streamed, ctx.answer_turn, ctx.request.platform
        assert ctx.usage_id is not None and turn_id is not None and ctx.conversation is not None
        final = streamed.final
        text = sanitize_output(final.text if final is not None else "".join(streamed.parts)).strip()
        completion = final.completion_tokens if final is not None else 0
        ttft = final.ttft_s if final is not None else None
        values = dict(
            **settlement(ctx.usage_id, "done", streamed=streamed.generated, completion=completion),
            text=text,
            status="done",
            finish_reason=clean_text(final.finish_reason or "eos")[:16] if final is not None else "eos",
            prompt_tokens=final.prompt_tokens if final is not None else 0,
            completion_tokens=completion,
            ttft_ms=round(ttft * 1000) if ttft is not None else None,
            duration_ms=round((time.monotonic() - streamed.started) * 1000),
        )
        # The user has seen this answer stream: its final write outlives a database blip (bounded retries)
        # and a request cancelled meanwhile (a task of its own), and the answer is shown even if it fails.
        write = asyncio.ensure_future(self.store_answer(ctx.conversation.id, turn_id, values))
        self.parts.writes.add(write)
        write.add_done_callback(self.parts.writes.discard)
        await asyncio.shield(write)
        metrics = self.parts.metrics
        metrics.tokens.labels(platform).inc(completion)
        if ttft is not None:
            metrics.ttft.labels(platform).observe(ttft)
        meta = {
            "tokens": completion, "turn_id": turn_id,
            "context_cut": final is not None and was_cut(self.parts.settings, final.prompt_tokens),
            "prompt_tokens": final.prompt_tokens if final is not None else 0,
            "cached_prompt_tokens": final.reused_prefix_tokens if final is not None else 0,
            "finish_reason": values["finish_reason"],
        }  # fmt: skip
        return Final(text or "(no answer)", kind="answer", meta=meta)

    async def store_answer(self, conversation_id: int, turn_id: int, values: dict[str, Any]) -> bool:
        """Write the finished answer, retrying while the database is unavailable; ``False`` (and an error
        naming the turn) when it gives up."""
        delays, db, metrics = self.parts.timing.STORE_RETRY_DELAYS_S, self.parts.db, self.parts.metrics
        for attempt in range(len(delays) + 1):
            try:
                # A try whose commit went through but whose reply was lost is done (the write is idempotent).
                if attempt and any(t.id == turn_id and t.status == "done" for t in await db.turns(conversation_id)):
                    return True
                await db.finish_turn(turn_id, **values)
            except Exception as exc:
                transient = is_unavailable(exc)
                if not transient or attempt == len(delays):
                    metrics.answers_unsaved.inc()
                    log.error(
                        "turn %s: giving up storing the answer after %d tr%s (the user was shown it): %r",
                        turn_id, attempt + 1, "y" if attempt == 0 else "ies", exc, exc_info=not transient,
                    )  # fmt: skip
                    return False
                metrics.answer_store_retries.inc()
                log.warning("turn %s: storing the answer failed (%r); retrying in %g s", turn_id, exc, delays[attempt])
                await asyncio.sleep(delays[attempt])
            else:
                if attempt:
                    log.info("turn %s: answer stored on try %d", turn_id, attempt + 1)
                return True
        return False  # pragma: no cover - the loop returns
