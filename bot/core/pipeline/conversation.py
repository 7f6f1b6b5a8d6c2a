"""The thread's conversation: read before the quota (:class:`Conversation`), written after it
(:class:`Record`: the question and a pending answer, in one transaction with the event id)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

from bot.core.backend_api import ChatTurn
from bot.core.commands import parse_message
from bot.core.errors import NoImageError
from bot.core.pipeline.chain import Context, Handler, Parts
from bot.core.requests import HistoryTurn, ReplyEvent
from bot.core.sanitize import clean_text

__all__ = ["Conversation", "Record", "model_input", "was_cut"]


def was_cut(settings: Any, prompt_tokens: int) -> bool:
    """Whether an answer's thread was cut from the left: backends report the prompt tokens they kept, at
    most ``max_length - max_new_tokens`` (the engine's cut); a prompt that reaches that size was cut (or
    fits exactly — the next turn will not)."""
    g = settings.generation
    return prompt_tokens >= g.max_length - g.max_new_tokens


async def model_input(db: Any, history: Sequence[Any]) -> tuple[list[ChatTurn], list[bytes]]:
    """The thread as model turns: finished answers only (failed/interrupted ones are left out), and no
    question whose message was retried (its retry asks it again)."""
    history = [t for t in history if not (t.role == "user" and t.status == "retried")]
    data = await db.image_data([t.image_id for t in history if t.image_id])
    turns: list[ChatTurn] = []
    images: list[bytes] = []
    for t in history:
        if t.role == "assistant":
            if t.status == "done" and t.text:
                turns.append({"role": "assistant", "text": t.text})
            continue
        turns.append({"role": "user", "text": t.text, "image": t.image_id is not None})
        if t.image_id is not None:
            images.append(data[t.image_id])
    return turns, images


class Conversation:
    """``ctx.conversation`` and ``ctx.history``: the thread's live conversation and its turns (none for a
    seeded request: the client's history replaces them).  A thread with no picture anywhere is refused."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    async def __call__(self, ctx: Context, call_next: Handler) -> AsyncGenerator[ReplyEvent, None]:
        db = self.parts.db
        ctx.conversation = await db.live_conversation(ctx.key)
        if ctx.conversation is not None and ctx.seeded is None:
            ctx.history = await db.turns(ctx.conversation.id)
        if not ctx.checked and not ctx.seeded_images and not any(t.image_id for t in ctx.history):
            raise NoImageError()
        async with aclosing(call_next(ctx)) as events:
            async for event in events:
                yield event


class Record:
    """Stores the question — a seeded history first, each new picture once, the user turn — and a pending
    answer, with the event id in the same transaction; then ``ctx.turns``/``ctx.images`` (what the model
    reads) and ``ctx.answer_turn``.  Only now is a conversation created: a refused request leaves none."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    async def __call__(self, ctx: Context, call_next: Handler) -> AsyncGenerator[ReplyEvent, None]:
        db, request = self.parts.db, ctx.request
        if ctx.seeded is not None and ctx.conversation is not None:  # the client's history replaces the stored one
            await db.archive_conversation(ctx.conversation.id)
            ctx.conversation = None
        if ctx.conversation is None:
            ctx.conversation = await db.get_or_create_conversation(ctx.key)
            ctx.history = await db.turns(ctx.conversation.id)
        new_turns = [row for turn, found in ctx.seeded or () for row in await self._rows(ctx, turn, found)]
        image_ids = [await db.add_image(c.data, c.mime, c.width, c.height) for c in ctx.checked]
        new_turns += [{"role": "user", "text": "", "image_id": i, "user_id": request.user} for i in image_ids[:-1]]
        new_turns.append({"role": "user", "text": ctx.question, "image_id": image_ids[-1] if image_ids else None,
                          "user_id": request.user})  # fmt: skip
        new_turns.append({"role": "assistant", "status": "pending", "worker": self.parts.worker.id})
        delivery = (request.platform, request.event_id) if request.event_id else None
        stored = await db.add_turns(ctx.conversation.id, new_turns, event=delivery)
        ctx.answer_turn = stored[-1].id
        ctx.turns, ctx.images = await model_input(db, ctx.history + stored[:-1])
        settings = self.parts.settings
        ctx.told_cut = any(was_cut(settings, t.prompt_tokens) for t in ctx.history
                           if t.role == "assistant" and t.status == "done")  # fmt: skip
        async with aclosing(call_next(ctx)) as events:
            async for event in events:
                yield event

    async def _rows(self, ctx: Context, turn: HistoryTurn, checked: list[Any]) -> list[dict[str, Any]]:
        """The turn rows one history turn is stored as: an answer as given; a user turn as a message is (its
        pictures first, a preset named in its text asked with its prompt)."""
        text, db, presets = clean_text(turn.text), self.parts.db, self.parts.presets
        if turn.role == "assistant":
            return [{"role": "assistant", "text": text, "status": "done", "finish_reason": "history"}]
        try:
            parsed = parse_message(text, presets.names, None)
            if parsed.command is None:
                text = clean_text(presets.question(parsed, bool(checked), ctx.request.workspace, ctx.request.channel))
        except KeyError:
            pass  # an unknown /word in an earlier message: kept as written
        ids = [await db.add_image(c.data, c.mime, c.width, c.height) for c in checked]
        rows: list[dict[str, Any]] = [{"role": "user", "text": "", "image_id": i, "user_id": ctx.request.user}
                                      for i in ids[:-1]]  # fmt: skip
        rows.append({"role": "user", "text": text, "image_id": ids[-1] if ids else None, "user_id": ctx.request.user})
        return rows
