"""What the fake platform servers (``tests/slack/fake_slack.py``, ``tests/discord/fake_discord.py``) share:
listening on a free loopback port and closing again, and waiting on their state.  Tests wait on the fake's
state — a call arrived, an ack came back — rather than sleeping: each state change wakes every waiter, and
waiting (``wait_for``) and quiet (``settle``) are written once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from aiohttp import web


class FakeServer:
    """Base of a fake platform server: it calls :meth:`_notify` after every change of its recorded state.

    A subclass says how much has happened (:meth:`_activity`: ``settle`` waits until it stops growing) and
    what to show when a wait times out (:meth:`_progress`); its ``start`` builds the routes and calls
    :meth:`_listen`.
    """

    _changed: asyncio.Event
    _runner: web.AppRunner | None
    _ws: web.WebSocketResponse | None  # the bot's live connection (Socket Mode, the gateway), if any
    port: int

    async def _listen(self, app: web.Application) -> None:
        """Serve ``app`` on a free loopback port (:attr:`port`, :attr:`base`)."""
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _activity(self) -> int:
        raise NotImplementedError

    def _progress(self) -> str:
        raise NotImplementedError

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> Any:
        """Wait until ``predicate()`` is truthy (checked after every state change); return its value."""
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(self._progress())
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 0.2))
        return value

    async def settle(self, quiet: float = 0.5) -> None:
        """Wait until no call has arrived for ``quiet`` seconds."""
        while True:
            count = self._activity()
            await asyncio.sleep(quiet)
            if count == self._activity():
                return
