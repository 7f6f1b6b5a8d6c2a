"""What every front end that is an aiohttp server shares (the web chat, the OpenAI-compatible API): its
runner, stopping it, and the readiness line when it is not listening."""

from __future__ import annotations

from aiohttp import web


class ServerFrontEnd:
    """Base of an aiohttp front end: ``start`` sets ``_runner``; ``stop`` and ``problem`` are the same for all."""

    _runner: web.AppRunner | None = None

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def problem(self) -> str | None:
        return None if self._runner is not None and self._runner.sites else "not listening"
