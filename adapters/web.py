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
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam
from pydantic import Field, field_validator

from adapters.http_front_end import ServerFrontEnd
from bot.core.frontend_api import Core, FrontEndContext, FrontEndPlugin, FrontEndSettings, ThreadView
from bot.core.images import format_size
from bot.core.requests import Final, ImageAttachment, ReplyFile, Request, ThreadRef, normalize_user

__all__ = ["FRONT_END", "STATIC_DIR", "WebFrontEnd", "WebSettings", "create_app", "run_web", "upload_limit"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "web_static"
UPLOAD_SLACK = 256 * 1024  # form fields and multipart framing on top of the pictures
FIELD_LIMIT = 32 * 1024  # one text field (question, ids, name)
MAX_PARTS = 64
THREAD_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
EVENT_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
SURROGATES_RE = re.compile("[\ud800-\udfff]")
PLAIN_TRANSFER = {"", "binary", "7bit", "8bit"}  # Content-Transfer-Encoding values that leave the bytes as they are

# What aiohttp's form and multipart readers raise on a malformed body: ValueError (bad framing or
# boundary, a bad part Content-Length, a non-ASCII ``_charset_``; also this module's BadForm),
# RuntimeError (an over-long ``_charset_`` field) and HttpProcessingError (bad part headers: no colon,
# a line over 8 KiB, too many; broken chunked framing).  Each is the client's mistake: a 400, never a 500.
MALFORMED_BODY: tuple[type[Exception], ...] = (ValueError, RuntimeError, HttpProcessingError)

# aiohttp warns (on stderr, through ``warnings``) about a malformed Content-Disposition and then reads the
# part as unnamed; ``_read_form`` refuses unnamed parts with a 400 and one log line, so the warning is noise.
warnings.filterwarnings("ignore", category=BadContentDispositionHeader)
warnings.filterwarnings("ignore", category=BadContentDispositionParam)


class _QuietBadRequests(logging.Filter):
    """aiohttp answers a request it cannot parse (request line, headers, chunked framing) with a 400 of its
    own but logs it at ERROR with a traceback: a client's mistake gets one INFO line here instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            log.info("bad HTTP request from %s (%s): %s", remote, type(exc).__name__, _one_line(exc))
            return False
        return True


if not any(isinstance(f, _QuietBadRequests) for f in logging.getLogger("aiohttp.server").filters):
    logging.getLogger("aiohttp.server").addFilter(_QuietBadRequests())

SERVICE_KEY = web.AppKey("core", Core)
CONFIG_KEY = web.AppKey("web_config", dict)
USER_KEY = web.RequestKey("user", str)  # request[USER_KEY]: who sent it (the auth proxy's header, else LOCAL_USER)
LOCAL_USER = "local"
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})  # asked by orchestrators by IP: no Host check
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("", "0.0.0.0", "::")
DEFAULT_PORTS = {"http": 80, "https": 443}
RASTER_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"})
DOWNLOAD_TYPE = "application/octet-stream"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


class UploadTooLarge(Exception):
    pass


class WebSettings(FrontEndSettings):
    """``[web]``: the local web chat, health and metrics endpoints (loopback by default)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names (name or name:port) the chat answers besides localhost, 127.0.0.1, [::1] and "
        "`host`: the public name behind a reverse proxy; '*' turns the check off",
    )
    user_header: str = Field(
        "",
        description="the request header a trusted auth proxy puts the signed-in user in (X-Forwarded-User); "
        "empty = every web message is the one local user",
        pattern=r"^[A-Za-z0-9-]*$",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        """A typo here would refuse every request at run time: say so when bot.toml is read."""
        for entry in hosts:
            if entry != "*" and _split_host(entry) is None:
                raise ValueError(f"{entry!r} is not a host name or name:port (e.g. chat.example.com)")
        return hosts


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``name[:port]`` (a Host header, an allow-list entry, an Origin's netloc) as (lower-case name, port);
    ``None`` when it is not one (userinfo, a path, a bad port)."""
    value = value.strip()
    if not value or any(c in value for c in "/@?#\\ "):
        return None
    try:
        parts = urlsplit(f"//{value}")
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    return (name, port) if name else None


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


def upload_limit(core: Core) -> int:
    """The most bytes one message may upload: every picture at its size limit, plus slack for the fields."""
    images = core.image_limits
    return images.max_bytes * images.max_per_message + UPLOAD_SLACK


def _file_json(file: ReplyFile) -> dict[str, Any]:
    """A reply file for the page: base64 bytes it turns into a blob: URL (shown inline or downloaded).

    Only raster pictures keep their type; anything else (a ``website`` answer's ``.html``: model output)
    goes as :data:`DOWNLOAD_TYPE`, so its blob: URL, which has the bot's origin, is a download when opened
    and never a page whose scripts run there.
    """
    data = base64.b64encode(file.data).decode("ascii")
    mime = file.mime if file.mime in RASTER_TYPES else DOWNLOAD_TYPE
    return {"filename": file.filename, "mime": mime, "title": file.title, "data": data}


def _json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, default=str)}\n\n".encode()


async def _security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")


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


# ---------------------------------------------------------------------- messages


class BadForm(ValueError):
    """The form is well framed but not what the page sends (no name, too many parts, an encoded part …)."""


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """The exception's message on one line, cut to ``limit`` characters (it may quote the client's bytes)."""
    if isinstance(exc, UnicodeDecodeError):
        return f"the text is not valid {exc.encoding} (at byte {exc.start})"
    message = exc.message if isinstance(exc, HttpProcessingError) and exc.message else str(exc)
    text = " ".join(str(message).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _decode_text(data: bytes, charset: str) -> str:
    """Form text as ``str``: in the part's declared charset (default UTF-8), undecodable bytes as U+FFFD.

    An unknown charset, or a codec that is not a text encoding (``base64`` …), is :class:`BadForm` (a 400).
    Lone surrogates (which some codecs produce) are replaced too, so a field is always valid Unicode that
    encodes to UTF-8.
    """
    try:
        codecs.lookup(charset)
        text = data.decode(charset, errors="replace")
    except LookupError:
        raise BadForm(f"unknown charset {charset[:40]!r}") from None
    return SURROGATES_RE.sub("\ufffd", text)


async def _read_form(request: web.Request, limit: int) -> tuple[dict[str, str], list[ImageAttachment]]:
    """Parse the multipart form, counting every byte against ``limit`` (raises :class:`UploadTooLarge`).

    A malformed body raises one of :data:`MALFORMED_BODY`.  Text fields are decoded as described in
    :func:`_decode_text`; unknown field names are ignored; every part must have a name (RFC 7578).
    """
    fields: dict[str, str] = {}
    images: list[ImageAttachment] = []
    total = 0
    reader = await request.multipart()
    parts = 0
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):  # nested multipart: not something the page sends
            raise BadForm("nested multipart bodies are not supported")
        parts += 1
        if parts > MAX_PARTS:
            raise BadForm("too many form parts")
        name = part.name
        if not name:  # no Content-Disposition, or one aiohttp could not read
            raise BadForm("a form part has no name (Content-Disposition: form-data; name=...)")
        transfer = part.headers.get("Content-Transfer-Encoding", "").strip().lower()
        encoding = part.headers.get("Content-Encoding", "identity").strip().lower()
        if transfer not in PLAIN_TRANSFER or encoding not in ("", "identity"):
            raise BadForm(f"the field {name[:40]!r} is encoded ({transfer or encoding}); send it as plain bytes")
        cap = limit if name == "image" else FIELD_LIMIT
        chunks: list[bytes] = []
        size = 0
        while chunk := await part.read_chunk(64 * 1024):
            size += len(chunk)
            total += len(chunk)
            if total > limit:
                raise UploadTooLarge()
            if size > cap:
                raise BadForm(f"the field {name[:40]!r} is too long")
            chunks.append(chunk)
        data = b"".join(chunks)
        if name == "image":
            if data or part.filename:  # an empty file input still sends an empty part
                mime = part.headers.get("Content-Type", "")
                images.append(ImageAttachment(data=data, filename=part.filename or "", mime=mime))
        else:
            fields[name] = _decode_text(data, part.get_charset(default="utf-8"))
    return fields, images


async def _read_urlencoded(request: web.Request) -> dict[str, str]:
    """A text-only ``application/x-www-form-urlencoded`` form, decoded like :func:`_read_form`'s text fields."""
    charset = request.charset or "utf-8"
    body = _decode_text(await request.read(), charset)  # read() enforces client_max_size (413)
    pairs = parse_qsl(body, keep_blank_values=True, encoding=charset, errors="replace", max_num_fields=MAX_PARTS)
    fields = {}
    for name, value in pairs:
        if len(value) > FIELD_LIMIT:
            raise BadForm(f"the field {name[:40]!r} is too long")
        fields[name] = SURROGATES_RE.sub("\ufffd", value)
    return fields


async def _post_message(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    config = request.app[CONFIG_KEY]
    limit = config["limit"]
    too_large = f"The upload is too large: at most {format_size(limit)} per message (pictures and text together)."
    if request.content_length is not None and request.content_length > limit:
        return _json_error(413, too_large, limit_bytes=limit)
    try:
        if request.content_type == "application/x-www-form-urlencoded":  # text only (no pictures)
            fields, images = await _read_urlencoded(request), []
        elif request.content_type.startswith("multipart/"):
            fields, images = await _read_form(request, limit)
        else:
            return _json_error(400, "Send the message as multipart/form-data.")
    except (UploadTooLarge, web.HTTPRequestEntityTooLarge):
        return _json_error(413, too_large, limit_bytes=limit)
    except MALFORMED_BODY as exc:  # the client's mistake: one log line, no traceback, a 400
        reason = _one_line(exc)
        log.info("web: bad form from %s (%s): %s", request.remote, type(exc).__name__, reason)
        return _json_error(400, f"Bad form: {reason.rstrip('.')}.")

    thread = fields.get("thread", "").strip()
    if not THREAD_RE.match(thread):
        return _json_error(400, "A thread id (letters, digits, - _ . :, at most 100) is required.")
    event_id = fields.get("event_id", "").strip() or None
    if event_id is not None and not EVENT_RE.match(event_id):
        return _json_error(400, "The event id is malformed.")
    user = request[USER_KEY]  # the auth proxy's user, else the one local user: never a form field
    refused = await _thread_of_another(request, ThreadRef(config["platform"], config["workspace"],
                                                          config["channel"], thread))  # fmt: skip
    if refused is not None:
        return refused
    preset = fields.get("preset", "").strip() or None
    bot_request = Request(
        platform=config["platform"],
        workspace=config["workspace"],
        channel=config["channel"],
        thread=thread,
        user=user,
        text=fields.get("text", ""),
        images=tuple(images),
        event_id=event_id,
        preset=preset,
    )

    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache, no-store",
            "X-Accel-Buffering": "no",
        },
    )
    replies = service.handle(bot_request)
    sent_any = False
    try:
        # Inside the try: a request whose body was broken after the form (chunked framing) closes the
        # connection, so even the headers may not go out.
        await response.prepare(request)
        async for event in replies:
            if isinstance(event, Final):
                payload = {"text": event.text, "kind": event.kind, "ephemeral": event.ephemeral, "meta": event.meta,
                           "files": [_file_json(f) for f in event.files]}  # fmt: skip
                await response.write(_sse("final", payload))
            else:
                await response.write(_sse("delta", {"text": event.text}))
            sent_any = True
        if not sent_any:  # the service drops a redelivered event id without a reply
            await response.write(_sse("duplicate", {"event_id": event_id}))
        await response.write_eof()
    except ConnectionError as exc:  # the browser left: aiohttp raises ClientConnectionResetError on write
        log.info("web client left thread %s mid-answer: %s", thread, exc)
    finally:
        # Closing the reply iterator tells the service to stop: the answer is marked interrupted.
        with contextlib.suppress(Exception):
            await replies.aclose()
    return response


# ---------------------------------------------------------------------- read-only API


def _ref(request: web.Request) -> ThreadRef | None:
    """The thread a read-only API path names, in this chat's channel (``None``: a malformed id)."""
    config, thread = request.app[CONFIG_KEY], request.match_info["thread"]
    if not THREAD_RE.match(thread):
        return None
    return ThreadRef(config["platform"], config["workspace"], config["channel"], thread)


def _of_another(request: web.Request, view: ThreadView) -> bool:
    """Behind a login proxy (``[web] user_header``) a thread id is no key: a thread is its starter's alone.
    Without one every message is the one local user's, so every thread is theirs."""
    starter = view.started_by
    return bool(request.app[GUARD_KEY].user_header) and bool(starter) and starter != request[USER_KEY]


def _refuse_another(request: web.Request, ref: ThreadRef, status: int, message: str) -> web.Response:
    log.warning("web: %s %s refused: thread %s was started by another user than %r", request.method,
                request.path, ref.thread, request[USER_KEY])  # fmt: skip
    return _json_error(status, message)


async def _thread_of_another(request: web.Request, ref: ThreadRef) -> web.Response | None:
    """A message into another user's thread would continue their conversation — their picture, their
    answers — so it is refused (403) before anything is stored; ``None``: go on."""
    if not request.app[GUARD_KEY].user_header:
        return None
    if _of_another(request, await request.app[SERVICE_KEY].thread(ref)):
        return _refuse_another(request, ref, 403, "This conversation was started by someone else: press New "
                               "chat to start your own.")  # fmt: skip
    return None


def _preset_splitter(presets: list[Any]) -> Any:
    """``asked(text) -> (preset, words)``: a stored question as the user sent it.  The core stores what the
    model was asked — a preset's prompt, then the user's words (``PresetBook.question``) — so a history view
    would show the whole prompt (the ``website`` one with its ```html fence); the longest prompt of this
    channel's presets that the text starts with gives the preset back.  A prompt changed in bot.toml since
    then no longer matches, and that turn shows as it was asked."""
    prompts = sorted(((p.prompt, p.name) for p in presets if p.prompt), key=lambda item: -len(item[0]))

    def asked(text: str) -> tuple[str | None, str]:
        for prompt, name in prompts:
            if text == prompt or text.startswith(prompt + " "):
                return name, text[len(prompt) :].strip()
        return None, text

    return asked


async def _thread_history(request: web.Request) -> web.Response:
    """The live conversation for a reloaded page: user turns as the user sent them (their words, the preset
    by name, the picture's URL), answers as stored.  Behind a login proxy, another user's thread is a 404."""
    service, config = request.app[SERVICE_KEY], request.app[CONFIG_KEY]
    ref = _ref(request)
    if ref is None:
        return _json_error(400, "Malformed thread id.")
    view = await service.thread(ref, turns=True)
    if _of_another(request, view):  # as for a thread id nobody uses: nothing to show
        return _refuse_another(request, ref, 404, "No such thread.")
    asked = _preset_splitter(service.presets(config["workspace"], config["channel"]))
    turns = []
    for t in view.turns:
        preset, text = asked(t.text) if t.role == "user" else (None, t.text)
        turn = {"id": t.id, "role": t.role, "text": text, "preset": preset, "status": t.status,
                "has_image": t.has_image, "created_at": t.created_at.isoformat() if t.created_at else None}  # fmt: skip
        if t.role == "user" and t.has_image:
            turn["image"] = f"/api/threads/{quote(ref.thread)}/images/{t.id}"
        turns.append(turn)
    return web.json_response({"thread": ref.thread, "turns": turns})


async def _thread_image(request: web.Request) -> web.Response:
    """A picture of the thread, for its history: only a turn of that thread's live conversation (the thread
    id, a random UUID the page keeps, is what grants it; behind a login proxy, only to the user who started
    the thread), as a raster picture or else as a download."""
    ref = _ref(request)
    if ref is None:
        return _json_error(400, "Malformed thread id.")
    service = request.app[SERVICE_KEY]
    if request.app[GUARD_KEY].user_header and _of_another(request, await service.thread(ref)):
        return _refuse_another(request, ref, 404, "No such picture in this thread.")
    picture = await service.thread_image(ref, int(request.match_info["turn"]))
    if picture is None:
        return _json_error(404, "No such picture in this thread.")
    headers = {"Cache-Control": "private, max-age=86400"}
    if picture.mime not in RASTER_TYPES:  # HEIC …: nothing a page could run, but never rendered here
        headers["Content-Disposition"] = f'attachment; filename="{picture.filename}"'
    mime = picture.mime if picture.mime in RASTER_TYPES else DOWNLOAD_TYPE
    return web.Response(body=picture.data, content_type=mime, headers=headers)


async def _presets(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    config = request.app[CONFIG_KEY]
    presets = [{"name": p.name, "prompt": p.prompt} for p in service.presets(config["workspace"], config["channel"])]
    return web.json_response({"default": service.default_preset, "presets": presets})


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
