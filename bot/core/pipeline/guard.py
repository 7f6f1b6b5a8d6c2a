"""The first two steps: drop a redelivered event (:class:`Dedup`), refuse whom the access rules refuse
(:class:`Access`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

from bot.core.errors import BotError, UnsupportedRequest
from bot.core.pipeline.chain import Context, Handler, Parts, log
from bot.core.requests import ReplyEvent, Request
from storage import ID_LENGTHS

__all__ = ["Access", "Dedup", "check_ids"]


def check_ids(request: Request) -> None:
    """Refuse ids longer than the tables keep (PostgreSQL would fail the first insert, SQLite would keep them:
    the same refusal on both, before anything is stored)."""
    for name, limit in ID_LENGTHS.items():
        if len(value := getattr(request, name) or "") > limit:
            raise UnsupportedRequest(
                f"the front end sent a {name} of {len(value)} characters; at most {limit} are stored"
            )


class Dedup:
    """A unique event id in SQL: a redelivered event (Slack's retries, a gateway replay) ends here, answered
    by nothing (``outcome`` ``duplicate``).  Ids too long to store are refused first.  A request with
    ``retry_refused`` that a later step refuses before its question is stored gives its id back."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    async def __call__(self, ctx: Context, call_next: Handler) -> AsyncGenerator[ReplyEvent, None]:
        request = ctx.request
        check_ids(request)
        if request.event_id and not await self.parts.db.mark_event(request.platform, request.event_id):
            log.info("ignoring redelivered event %s/%s", request.platform, request.event_id)
            ctx.outcome = "duplicate"
            return
        try:
            async with aclosing(call_next(ctx)) as events:
                async for event in events:
                    yield event
        except BotError:
            if request.event_id and request.retry_refused and ctx.answer_turn is None:
                await self._give_back(request.platform, request.event_id)
            raise

    async def _give_back(self, platform: str, event_id: str) -> None:
        try:  # shielded: a client that leaves at once still frees its key
            await asyncio.shield(self.parts.db.forget_event(platform, event_id))
        except Exception as exc:  # the refusal goes out anyway; a retry with the key is then a duplicate
            log.error("event %s/%s: could not give back the id of a refused request: %r", platform, event_id, exc)


class Access:
    """The access rules (:class:`~bot.core.access.AccessControl`): a refused user, channel or role ends the
    request with :class:`~bot.core.errors.AccessDenied` before anything is read or stored."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    async def __call__(self, ctx: Context, call_next: Handler) -> AsyncGenerator[ReplyEvent, None]:
        r = ctx.request
        await self.parts.access.check(r.platform, r.workspace, r.channel, r.user, roles=r.roles)
        async with aclosing(call_next(ctx)) as events:
            async for event in events:
                yield event
