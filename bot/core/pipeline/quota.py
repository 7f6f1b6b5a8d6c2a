"""The quota step: the request is admitted against the limits and its usage reserved, in one transaction
(:meth:`bot.core.quotas.QuotaPolicy.admit`: the module that owns the rules); a request that fails before its
question is stored gives the reservation back (:meth:`~bot.core.quotas.QuotaPolicy.release`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

from bot.core.pipeline.chain import Context, Handler, Parts, log
from bot.core.requests import ReplyEvent

__all__ = ["Quota"]


class Quota:
    """``ctx.usage_id``: the reservation, which the store step settles with the answer's final write."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    async def __call__(self, ctx: Context, call_next: Handler) -> AsyncGenerator[ReplyEvent, None]:
        r = ctx.request
        pictures = len(ctx.checked) + len(ctx.seeded_images)
        ctx.usage_id = usage_id = await self.parts.quotas.admit(r.platform, r.workspace, r.user, pictures)
        try:
            async with aclosing(call_next(ctx)) as events:
                async for event in events:
                    yield event
        except BaseException:
            if ctx.answer_turn is None:  # nothing was stored or sent: the request is not charged
                await self._release(usage_id)
            raise

    async def _release(self, usage_id: int) -> None:
        try:
            await asyncio.shield(self.parts.quotas.release(usage_id))
        except Exception as exc:
            log.error("usage entry %s: could not release the reservation of an unstored request: %r", usage_id, exc)
