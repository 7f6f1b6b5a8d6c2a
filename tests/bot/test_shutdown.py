"""close_quietly (bot/core/shutdown.py): a shutdown step's failure does not stop the steps after it."""

from __future__ import annotations

import asyncio

import pytest

from bot.core.shutdown import close_quietly


class Handle:
    """Something opened: its close may fail the way a client's goodbye to a gone server does."""

    def __init__(self, fails: BaseException | None = None) -> None:
        self.fails, self.closed = fails, False

    async def close(self) -> None:
        self.closed = True
        if self.fails is not None:
            raise self.fails


def test_each_step_runs_and_a_failed_close_is_dropped() -> None:
    async def main() -> None:
        broken, fine = Handle(ConnectionResetError("server gone")), Handle()
        await close_quietly(broken.close)
        await close_quietly(None)  # nothing was opened
        await close_quietly(fine.close)
        assert broken.closed and fine.closed

    asyncio.run(main())


def test_cancelling_the_shutdown_is_not_swallowed() -> None:
    async def main() -> None:
        with pytest.raises(asyncio.CancelledError):
            await close_quietly(Handle(asyncio.CancelledError()).close)

    asyncio.run(main())
