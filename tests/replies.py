"""Core replies for the front ends' streaming tests (``adapters.streaming`` and each platform's use of it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from bot.core.requests import Delta


async def endless_answer(closed: asyncio.Event) -> AsyncIterator[Delta]:
    """A reply that shows "so far" and never ends; ``closed`` is set once the front end closes it, which the
    shutdown tests check: a reply cut short must close the core's iterator (the answer is then stored as
    interrupted)."""
    try:
        yield Delta("so far")
        await asyncio.sleep(3600)
    finally:
        closed.set()
