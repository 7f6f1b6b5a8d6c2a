"""Closing what a part opened, on the way out (front ends' ``stop``, the Chromium screenshotter's ``close``).

Each step of a shutdown runs even when the one before it failed: a client that cannot say goodbye to its
server must not keep the browser, the socket or the HTTP session after it open.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

__all__ = ["close_quietly"]


async def close_quietly(close: Callable[[], Awaitable[object]] | None) -> None:
    """Await ``close()`` — ``None`` when nothing was opened — and drop its failure (an ``Exception``)."""
    if close is not None:
        with contextlib.suppress(Exception):
            await close()
