"""``POST /api/messages``: the form as one :class:`~bot.core.requests.Request`, the reply events as
Server-Sent Events (``delta`` … ``final``, or ``duplicate``)."""

from __future__ import annotations

import base64
import contextlib
import json
import re
from typing import Any

from aiohttp import web

from adapters.web.common import CONFIG_KEY, SERVICE_KEY, USER_KEY, _json_error, _one_line, log, shown_type, thread_ref
from adapters.web.forms import MALFORMED_BODY, UploadTooLarge, _read_form, _read_urlencoded
from adapters.web.threads import _thread_of_another
from bot.core.images import format_size
from bot.core.requests import Final, ImageAttachment, ReplyFile, Request

EVENT_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


def _file_json(file: ReplyFile) -> dict[str, Any]:
    """A reply file for the page: base64 bytes it turns into a blob: URL (shown inline or downloaded).

    Only raster pictures keep their type (:func:`~adapters.web.common.shown_type`): anything else (a
    ``website`` answer's ``.html``: model output) goes as a download type, so its blob: URL, which has the
    bot's origin, is a download when opened and never a page whose scripts run there.
    """
    data = base64.b64encode(file.data).decode("ascii")
    mime = shown_type(file.mime)
    return {"filename": file.filename, "mime": mime, "title": file.title, "data": data}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, default=str)}\n\n".encode()


async def _post_message(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    config = request.app[CONFIG_KEY]
    limit = config["limit"]
    too_large = f"The upload is too large: at most {format_size(limit)} per message (pictures and text together)."
    if request.content_length is not None and request.content_length > limit:
        return _json_error(413, too_large, limit_bytes=limit)
    try:
        if request.content_type == "application/x-www-form-urlencoded":  # text only (no pictures)
            images: list[ImageAttachment] = []
            fields = await _read_urlencoded(request)
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
    ref = thread_ref(request, thread)
    if ref is None:
        return _json_error(400, "A thread id (letters, digits, - _ . :, at most 100) is required.")
    event_id = fields.get("event_id", "").strip() or None
    if event_id is not None and not EVENT_RE.match(event_id):
        return _json_error(400, "The event id is malformed.")
    user = request[USER_KEY]  # the auth proxy's user, else the one local user: never a form field
    refused = await _thread_of_another(request, ref)
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
