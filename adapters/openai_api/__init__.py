"""The OpenAI-compatible API front end: ``/v1/models`` and ``/v1/chat/completions`` for every tool that
speaks them (Open WebUI, LibreChat, llmcord, the ``openai`` SDK), with the bot's keys, quotas and history.

Like every front end it goes through :class:`~bot.core.frontend_api.Core` only: a key (``minigpt4-bot admin keys
create``) stands for a user of a workspace on platform ``openai``, so access rules, quotas, picture checks,
stored answers and ``admin usage`` apply as for Slack.  Not named ``adapters/openai`` so as not to shadow
the ``openai`` package.  Set-up, what is supported and what not: docs/openai-api.md.

Modules: :mod:`.app` (HTTP: routes, keys, errors, streaming), :mod:`.chat` (the request body and the
stored thread a stateless conversation continues), :mod:`.images` (``data:`` URLs, remote pictures
without SSRF).
"""

from __future__ import annotations

import logging

from aiohttp import web
from pydantic import Field

from adapters.http_front_end import ServerFrontEnd
from adapters.openai_api.app import PLATFORM, create_app
from adapters.shared_settings import Port, ServerSettings
from bot.core.frontend_api import Core, FrontEndContext, FrontEndPlugin, FrontEndSetupError

__all__ = ["FRONT_END", "OpenAIFrontEnd", "OpenAISettings", "create_app"]

log = logging.getLogger(__name__)


class OpenAISettings(ServerSettings):
    """``[openai]``: the OpenAI-compatible API (loopback by default; off unless enabled)."""

    enabled: bool = False
    port: Port = 8081
    model_id: str = Field("minigpt4", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="the id /v1/models lists")
    fetch_remote_images: bool = Field(False, description="fetch http(s) image_url pictures (public addresses only)")
    fetch_timeout_s: float = Field(5.0, gt=0, le=60)
    max_redirects: int = Field(3, ge=0, le=10)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="the largest request body (pictures in it)")


class OpenAIFrontEnd(ServerFrontEnd):
    """The API as a :class:`~bot.core.frontend_api.FrontEnd`: ``start`` listens, ``stop`` closes (answers in flight are
    interrupted and stored as such)."""

    name = PLATFORM

    def __init__(self, core: Core, settings: OpenAISettings) -> None:
        self.core, self.settings = core, settings
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int | None:
        """The port it listens on (``port = 0`` picks a free one)."""
        for address in self._runner.addresses if self._runner else ():
            if isinstance(address, tuple) and len(address) >= 2:
                return int(address[1])
        return None

    async def start(self) -> None:
        runner = web.AppRunner(create_app(self.core, self.settings), access_log=None, handler_cancellation=True)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.settings.host, self.settings.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise FrontEndSetupError(
                f"the OpenAI-compatible API cannot listen on {self.settings.host}:{self.settings.port}: "
                f"{exc.strerror or exc} (set [openai] port in bot.toml)"
            ) from exc
        self._runner = runner
        log.info("OpenAI-compatible API on http://%s:%s/v1", self.settings.host, self.port)


def _create(core: Core, settings: OpenAISettings, _context: FrontEndContext) -> OpenAIFrontEnd:
    return OpenAIFrontEnd(core, settings)


FRONT_END = FrontEndPlugin(name=PLATFORM, settings=OpenAISettings, create=_create, docs="docs/openai-api.md")
