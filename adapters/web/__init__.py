"""The local web chat, health check and metrics over aiohttp: HTTP in, :class:`~bot.core.requests.Request` out.

Routes
    ``GET /``                     the chat page (``adapters/web_static/index.html``); assets under ``/static/``
    ``POST /api/messages``        multipart form → Server-Sent Events (``delta`` … ``final``, or ``duplicate``)
    ``GET /api/threads/{thread}`` the thread's live conversation, for reloading the page (user turns as sent:
                                  words, preset name, picture URL)
    ``GET /api/threads/{thread}/images/{turn}``  the picture of one of its user turns
    ``GET /api/presets``          preset names and prompts
    ``GET /healthz``              liveness, cheap (no database): ``{"status": "ok", "model": …, "engine": …}``
    ``GET /readyz``               readiness: 200 ``{"status": "ready", "checks": …}`` or 503 naming each failing check
    ``GET /metrics``              Prometheus text format (readiness gauges refreshed first)

The adapter is thin: it parses the form, enforces an overall upload limit, hands one
``Request`` to :meth:`Core.handle <bot.core.frontend_api.Core.handle>` and writes each reply event as it arrives.
A malformed body (bad framing, boundary or part headers, an unknown charset …) gets a 400 with a one-line
JSON ``{"error": …}`` and one INFO log line; form text is UTF-8 (or the part's declared charset), and bytes
that do not decode become U+FFFD rather than an error.
It uses nothing of the core but the :class:`~bot.core.frontend_api.Core` protocol, and is registered as the
``web`` front end (:data:`FRONT_END`, ``[web]`` in bot.toml) — the worked example in docs/adapters.md.  When the
browser goes away mid-answer, :func:`run_web`'s server cancels the handler (with a server that
does not cancel handlers, the next write fails instead); either way the reply iterator is
closed and the service marks the answer ``interrupted``.  Everything the page shows comes from this origin (a strict
Content-Security-Policy forbids anything else).

Every path but the probes answers only its own Host names, a state-changing request only its own Origin,
and the web user is the auth proxy's header or the one local user (:class:`RequestGuard`, docs/deployment.md);
behind the proxy a thread — its history, its pictures, its follow-ups — is the user's who started it.

Modules by job: :mod:`~adapters.web.app` (the application, its routes, :func:`run_web` and :data:`FRONT_END`),
:mod:`~adapters.web.guard` (Host, Origin and user), :mod:`~adapters.web.forms` (the message form),
:mod:`~adapters.web.messages` (``POST /api/messages``), :mod:`~adapters.web.threads` (the read-only API),
:mod:`~adapters.web.settings` (``[web]``) and :mod:`~adapters.web.common` (keys and helpers they share).
"""

from __future__ import annotations

from adapters.web.app import FRONT_END, STATIC_DIR, WebFrontEnd, create_app, run_web
from adapters.web.forms import upload_limit
from adapters.web.settings import WebSettings

__all__ = ["FRONT_END", "STATIC_DIR", "WebFrontEnd", "WebSettings", "create_app", "run_web", "upload_limit"]
