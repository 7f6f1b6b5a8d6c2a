"""Which requests the chat answers (its own Host names, its own Origin) and who sent them; the security
headers every response carries."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from adapters.web.common import LOCAL_USER, USER_KEY, _json_error, log
from adapters.web.settings import _split_host
from bot.core.requests import normalize_user

PROBES = frozenset({"/healthz", "/readyz", "/metrics"})  # asked by orchestrators by IP: no Host check
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("", "0.0.0.0", "::")
DEFAULT_PORTS = {"http": 80, "https": 443}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


class RequestGuard:
    """Which requests the chat answers: the Host must be one of its own names (DNS rebinding: a page at
    evil.example that re-resolves to 127.0.0.1 sends ``Host: evil.example``), and a state-changing request
    from a browser must come from the chat's own origin (cross-site forms and fetches send another
    ``Origin``).  Also who a request is from: the trusted auth proxy's header (``user_header``), else the
    one local user — never a name the client picks."""

    def __init__(self, bind_host: str, allowed_hosts: list[str] | tuple[str, ...] = (), user_header: str = "") -> None:
        self.any_host = "*" in allowed_hosts
        self.explicit = {h for e in allowed_hosts if e != "*" and (h := _split_host(e)) is not None}
        bad = [e for e in allowed_hosts if e != "*" and _split_host(e) is None]
        if bad:
            raise ValueError(f"[web] allowed_hosts: {bad[0]!r} is not a host name or name:port")
        names = set(LOOPBACK_NAMES)
        bound = bind_host.strip("[]").lower()
        if bound not in WILDCARD_BINDS:
            names.add(bound)
        self.names = frozenset(names)  # any port: the chat's own names cannot be rebound
        self.user_header = user_header

    def host_allowed(self, host: str | None) -> bool:
        if self.any_host:
            return True
        parsed = _split_host(host or "")
        if parsed is None:
            return False
        name, port = parsed
        return name in self.names or (name, port) in self.explicit or (name, None) in self.explicit

    def origin_allowed(self, origin: str | None, host: str | None, fetch_site: str | None) -> bool:
        """No ``Origin`` (curl, a script): allowed unless the browser says cross-site.  Else its host must be
        the request's own ``Host`` (same origin, default ports filled in) or an ``allowed_hosts`` entry."""
        if origin is None:
            return fetch_site not in ("cross-site", "same-site")
        try:
            parts = urlsplit(origin)
            scheme, name, port = parts.scheme, parts.hostname, parts.port
        except ValueError:
            return False
        if scheme not in DEFAULT_PORTS or not name:  # "null" (sandboxed pages, file:), odd schemes
            return False
        port = port or DEFAULT_PORTS[scheme]
        if (name, port) in self.explicit or (name, None) in self.explicit:
            return True
        own = _split_host(host or "")
        return own is not None and own[0] == name and (own[1] or DEFAULT_PORTS[scheme]) == port

    def user(self, request: web.Request) -> str | None:
        """Who sent ``request``: the proxy's header when one is configured (``None`` when it is missing:
        the request did not come through the proxy), else :data:`LOCAL_USER`."""
        if not self.user_header:
            return LOCAL_USER
        return normalize_user("web", request.headers.get(self.user_header, "")) or None


GUARD_KEY = web.AppKey("web_guard", RequestGuard)


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Refuse a foreign Host (403), a cross-site state-changing request (403) and, with an auth proxy
    configured, an API request without its user header (401) — each with one log line."""
    guard = request.app[GUARD_KEY]
    host = request.headers.get(hdrs.HOST)
    if request.path in PROBES:
        return await handler(request)
    if not guard.host_allowed(host):
        log.warning("web: refused a request for Host %r from %s (not in [web] allowed_hosts)", host, request.remote)
        return _json_error(403, "This host name is not one of the chat's: add it to [web] allowed_hosts.")
    if request.method not in SAFE_METHODS:
        origin, site = request.headers.get(hdrs.ORIGIN), request.headers.get("Sec-Fetch-Site")
        if not guard.origin_allowed(origin, host, site):
            log.warning("web: refused a cross-site %s %s (Origin %r) from %s", request.method, request.path,
                        origin, request.remote)  # fmt: skip
            return _json_error(403, "Cross-site requests are refused: use the chat page itself.")
    if request.path.startswith("/api/"):
        user = guard.user(request)
        if user is None:
            log.warning("web: %s %s without the %s header from %s", request.method, request.path,
                        guard.user_header, request.remote)  # fmt: skip
            return _json_error(401, "Sign in first: this chat is reached through its login proxy.")
        request[USER_KEY] = user
    return await handler(request)


async def _security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
