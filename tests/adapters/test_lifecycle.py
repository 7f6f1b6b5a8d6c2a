"""A chat front end's ``start`` that fails or is cancelled half-way closes what it opened (adapters/lifecycle.py)."""

from __future__ import annotations

import asyncio

import pytest

from adapters.lifecycle import start_or_undo


class Opened:
    """A stand-in front end: ``start`` opens a session, then waits on what the test hands it."""

    def __init__(self) -> None:
        self.session_open = False
        self.stops = 0

    async def start(self, then: asyncio.Future[None]) -> None:
        self.session_open = True
        await then

    async def stop(self) -> None:
        self.stops += 1
        self.session_open = False


def test_a_start_that_succeeds_is_not_undone() -> None:
    async def main() -> None:
        front = Opened()
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        await start_or_undo(front.start(done), front.stop)
        assert front.session_open and front.stops == 0

    asyncio.run(main())


def test_a_failed_start_is_stopped_and_its_error_goes_on() -> None:
    async def main() -> None:
        front = Opened()
        rejected = asyncio.get_running_loop().create_future()
        rejected.set_exception(PermissionError("token rejected"))
        with pytest.raises(PermissionError, match="token rejected"):
            await start_or_undo(front.start(rejected), front.stop)
        assert not front.session_open and front.stops == 1

    asyncio.run(main())


def test_a_cancelled_start_is_stopped_too() -> None:
    async def main() -> None:
        front = Opened()
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(start_or_undo(front.start(never), front.stop))
        await asyncio.sleep(0)
        assert front.session_open
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not front.session_open and front.stops == 1

    asyncio.run(main())
