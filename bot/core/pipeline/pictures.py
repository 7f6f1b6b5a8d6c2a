"""The pictures step: the message's pictures (and those of a seeded history) counted, decoded and checked
(:func:`~bot.core.images.check_images`, off the event loop) before anything is stored or charged."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from bot.core.errors import ImageError
from bot.core.images import check_images
from bot.core.pipeline.chain import Context, Handler, Parts
from bot.core.requests import HistoryTurn, ReplyEvent, Request
from bot.core.sanitize import clean_text

__all__ = ["Pictures", "seed_turns"]


async def seed_turns(request: Request, limits: Any) -> list[tuple[HistoryTurn, list[Any]]]:
    """The request's :attr:`~bot.core.requests.Request.history`, each user turn's pictures checked as a
    message's are (a bad one is named by its message), before anything is stored or charged."""
    seeded = []
    for number, turn in enumerate(request.history or (), start=1):
        if turn.role == "user" and any(img.error for img in turn.images):
            raise ImageError(next(img.error for img in turn.images if img.error) or "")
        named = [(img.data, clean_text(img.filename) or f"picture {i + 1} of message {number}") for i, img in
                 enumerate(turn.images)]  # fmt: skip
        seeded.append((turn, await check_images(named, limits) if turn.role == "user" else []))
    return seeded


class Pictures:
    """``ctx.checked`` (the message's pictures) and ``ctx.seeded`` (a seeded history's turns with theirs):
    at most ``[images] max_per_message`` a message, each one a picture the core reads within the limits."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    async def __call__(self, ctx: Context, call_next: Handler) -> AsyncGenerator[ReplyEvent, None]:
        request, limits = ctx.request, self.parts.settings.images
        if len(request.images) > limits.max_per_message:
            raise ImageError(f"Please send at most {limits.max_per_message} pictures per message.")
        named = [(img.data, img.filename or f"picture {i + 1}") for i, img in enumerate(request.images)]
        ctx.checked = await check_images(named, limits)  # decoded off the event loop, in a bounded pool
        ctx.seeded = await seed_turns(request, limits) if request.history is not None else None
        async with aclosing(call_next(ctx)) as events:
            async for event in events:
                yield event
