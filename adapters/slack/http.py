"""The HTTP Events API endpoint: Slack's signature is checked and the body parsed before bolt sees a request.

bolt verifies signatures itself, but a timestamp header that is not a number (``int("abc")`` inside
slack_sdk's verifier) or a signed body that is not JSON raises inside its dispatch: an HTTP 500 and two
tracebacks per request.  Here a request that is not fresh and correctly signed is a 401, a signed body that
does not parse is a 400, each with one warning line and nothing parsed or stored; only the rest reaches
``AsyncApp.async_dispatch`` (which verifies again), through bolt's own aiohttp adapter functions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_bolt.request.internals import parse_body
from slack_sdk.signature import SignatureVerifier

__all__ = ["MAX_AGE_S", "events_app", "malformed", "unverified"]

log = logging.getLogger(__name__)

MAX_AGE_S = 300
"""Slack's replay window: a request signed more than five minutes ago (or ahead) is refused."""


def unverified(body: bytes, headers: Mapping[str, str], verifier: SignatureVerifier, now: float) -> str | None:
    """Why this is not a fresh request signed with the app's signing secret (for the log), else ``None``."""
    timestamp = headers.get("X-Slack-Request-Timestamp", "")
    signature = headers.get("X-Slack-Signature", "")
    if not (timestamp.isascii() and timestamp.isdigit()):
        return f"X-Slack-Request-Timestamp is not a Unix time ({timestamp[:40]!r})"
    if abs(now - int(timestamp)) > MAX_AGE_S:
        return f"X-Slack-Request-Timestamp is {now - int(timestamp):.0f} s old (a replay, or a wrong clock)"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "the body is not UTF-8"
    if not signature or not verifier.is_valid(text, timestamp, signature):
        return "X-Slack-Signature does not match (another app's signing secret, or a forged request)"
    return None


def malformed(text: str, content_type: str | None) -> str | None:
    """Why a signed body cannot be read as a Slack payload (parsed the way bolt will parse it), else ``None``."""
    try:
        payload = parse_body(text, content_type)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return f"the body is not valid JSON ({type(exc).__name__}: {str(exc)[:80]})"
    if not isinstance(payload, dict):
        return f"the body is JSON but not an object ({type(payload).__name__})"
    return None


def events_app(bolt: AsyncApp, signing_secret: str, path: str) -> web.Application:
    """An aiohttp application that serves ``POST path`` for ``bolt`` after the checks above."""
    verifier = SignatureVerifier(signing_secret)

    async def events(request: web.Request) -> web.Response:
        body = await request.read()
        if reason := unverified(body, request.headers, verifier, verifier.clock.now()):
            log.warning("Slack Events API: refused a request from %s (401): %s", request.remote, reason)
            return web.Response(status=401)
        content_type = request.headers.get("Content-Type", "").split(";")[0] or None  # as bolt reads it
        if reason := malformed(body.decode("utf-8"), content_type):
            log.warning("Slack Events API: a signed request from %s is unreadable (400): %s", request.remote, reason)
            return web.Response(status=400)
        return await to_aiohttp_response(await bolt.async_dispatch(await to_bolt_request(request)))

    app = web.Application()
    app.router.add_post(path, events)
    return app
