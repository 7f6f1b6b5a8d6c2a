"""Start-up that cleans up after itself, shared by the chat front ends (Slack, Discord).

``serve`` stops only the front ends that started, so a ``start`` that fails half-way (a rejected token after
the HTTP session opened, a gateway that never answers, Ctrl-C) must close what it opened before the error
goes on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

__all__ = ["start_or_undo"]


async def start_or_undo(start: Awaitable[None], stop: Callable[[], Awaitable[None]]) -> None:
    """Await ``start``; should it fail or be cancelled, await ``stop`` (which closes what was opened), then re-raise."""
    try:
        await start
    except BaseException:
        await stop()
        raise
