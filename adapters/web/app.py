"""The web chat's aiohttp application (its routes, the page, the probes), :func:`run_web` and the ``web``
front end (:data:`FRONT_END`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from adapters.http_front_end import ServerFrontEnd
from adapters.web.common import CONFIG_KEY, SERVICE_KEY, log
from adapters.web.forms import upload_limit
from adapters.web.guard import GUARD_KEY, RequestGuard, _guard, _security_headers
from adapters.web.messages import _post_message
from adapters.web.settings import WebSettings
from adapters.web.threads import _presets, _thread_history, _thread_image
from bot.core.frontend_api import Core, FrontEndContext, FrontEndPlugin

STATIC_DIR = Path(__file__).resolve().parent.parent / "web_static"


def create_app(
    core: Core,
    *,
    platform: str = "web",
    workspace: str = "local",
    channel: str = "chat",
    host: str = "127.0.0.1",
    allowed_hosts: list[str] | tuple[str, ...] = (),
    user_header: str = "",
) -> web.Application:
    """The aiohttp application serving the chat page and its API for one core.

    ``host`` (where it listens), ``allowed_hosts`` and ``user_header``: see :class:`RequestGuard`.
    """
    limit = upload_limit(core)
    app = web.Application(client_max_size=limit, middlewares=[_guard])
    app[GUARD_KEY] = RequestGuard(host, allowed_hosts, user_header)
    app[SERVICE_KEY] = core
    app[CONFIG_KEY] = {"platform": platform, "workspace": workspace, "channel": channel, "limit": limit}
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC_DIR, name="static")
    app.router.add_post("/api/messages", _post_message)
    app.router.add_get("/api/threads/{thread}", _thread_history)
    app.router.add_get("/api/threads/{thread}/images/{turn:[0-9]{1,18}}", _thread_image)
    app.router.add_get("/api/presets", _presets)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


async def run_web(core: Core, host: str, port: int, **kwargs: Any) -> web.AppRunner:
    """Start the web front end on ``host:port`` (0 = any free port); the caller stops the runner.

    Handlers are cancelled when their client disconnects, so a closed tab stops its answer at once
    (even while it still waits for the first token); the service marks that answer interrupted.
    """
    runner = web.AppRunner(create_app(core, host=host, **kwargs), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            shown = f"[{address[0]}]" if ":" in str(address[0]) else address[0]
            log.info("web chat on http://%s:%s/", shown, address[1])
    return runner


# ---------------------------------------------------------------------- page


async def _index(_request: web.Request) -> web.StreamResponse:
    response = web.FileResponse(STATIC_DIR / "index.html")
    response.headers["Cache-Control"] = "no-cache"
    return response


async def _healthz(request: web.Request) -> web.Response:
    """Liveness: the process and its event loop answer (the database is not asked: see /readyz)."""
    health = await request.app[SERVICE_KEY].health()
    if not health.ok:
        problems = "; ".join(f"{name}: {state}" for name, state in health.checks.items() if state != "ok")
        return web.json_response({"status": "error", "error": problems, "checks": health.checks}, status=503)
    body = {"status": "ok", "model": health.model, "engine": health.engine}
    return web.json_response(body, dumps=lambda obj: json.dumps(obj, default=str))


async def _readyz(request: web.Request) -> web.Response:
    """Readiness: the database answers, the engine runs, every front end is connected — else 503."""
    ready = await request.app[SERVICE_KEY].readiness()
    if not ready.ok:
        problems = "; ".join(f"{name}: {state}" for name, state in ready.checks.items() if state != "ok")
        return web.json_response({"status": "unavailable", "error": problems, "checks": ready.checks}, status=503)
    return web.json_response({"status": "ready", "checks": ready.checks})


async def _metrics(request: web.Request) -> web.Response:
    core = request.app[SERVICE_KEY]
    await core.readiness()  # minigpt4_ready / minigpt4_check_ok as of this scrape
    body = core.metrics_text()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


# ---------------------------------------------------------------------- the front end


class WebFrontEnd(ServerFrontEnd):
    """The web chat as a :class:`~bot.core.frontend_api.FrontEnd`: ``start`` listens, ``stop`` closes (answers in
    flight are interrupted and stored as such)."""

    name = "web"

    def __init__(self, core: Core, settings: WebSettings) -> None:
        self.core, self.settings = core, settings
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        settings = self.settings
        self._runner = await run_web(
            self.core, settings.host, settings.port, allowed_hosts=settings.allowed_hosts,
            user_header=settings.user_header,
        )  # fmt: skip


def _create(core: Core, settings: WebSettings, _context: FrontEndContext) -> WebFrontEnd:
    return WebFrontEnd(core, settings)


FRONT_END = FrontEndPlugin(
    name="web",
    settings=WebSettings,
    create=_create,
    docs="docs/adapters.md",
    case_insensitive_users=True,  # a login proxy's user names: Alice and alice are one person
)
