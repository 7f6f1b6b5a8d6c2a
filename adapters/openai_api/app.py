"""The HTTP side of the OpenAI-compatible API: routes, keys, errors, streaming (aiohttp).

Routes
    ``GET  /v1/models``            the served model and one id per preset (``minigpt4:recipe``)
    ``GET  /v1/models/{id}``       one of them
    ``POST /v1/chat/completions``  an answer, streamed (``chat.completion.chunk`` SSE, ``data: [DONE]``) or not

Every route wants ``Authorization: Bearer KEY`` (``minigpt4-bot admin keys create``); the key is never
logged.  Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with the status
codes its SDK maps: 400 bad input, 401 no or bad key, 403 an access rule, 404 an unknown model, 413 a body
too large, 429 a quota (``Retry-After``: seconds until it resets), 503 busy (``Retry-After``) or the model
failing; an error after the answer began streaming is an error chunk, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from adapters.openai_api.chat import BadRequest, ChatCall, Message, parse_body, place
from adapters.openai_api.images import AddressPolicy, RemoteImages, decode_data_url, is_public_address
from bot.core.frontend_api import ApiKeyOwner, Core
from bot.core.grounding import settled
from bot.core.requests import Delta, Final, HistoryTurn, ImageAttachment, ReplyEvent, Request

__all__ = ["PLATFORM", "create_app"]

log = logging.getLogger(__name__)

PLATFORM = "openai"
CORE_KEY = web.AppKey("openai_core", Core)
CONFIG_KEY = web.AppKey("openai_config", dict)
IMAGES_KEY = web.AppKey("openai_images", RemoteImages)
OWNER_KEY = web.RequestKey("openai_owner", ApiKeyOwner)
IDEMPOTENCY_HEADER = "Idempotency-Key"
OFF_LOOP_BYTES = 256 * 1024  # bodies above this are parsed in a thread (the event loop keeps streaming)

STATUS = {  # the core's refusal reasons → (HTTP status, OpenAI error type, code)
    "bad_input": (400, "invalid_request_error", None),
    "unsupported": (400, "invalid_request_error", "unsupported_identifier"),
    "access_denied": (403, "permission_error", "access_denied"),
    "quota": (429, "insufficient_quota", "insufficient_quota"),
    "busy": (503, "server_error", "busy"),
    "unavailable": (503, "server_error", "model_unavailable"),
}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, retry_after_s: float | None = None) -> web.Response:  # fmt: skip
    headers = {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
        if retry_after_s > 120:  # the SDK would retry within seconds: tell it not to
            headers["x-should-retry"] = "false"
    return web.json_response(error_body(message, kind, param, code), status=status, headers=headers)


def _duplicate() -> web.Response:
    """A 409 for a retried ``Idempotency-Key`` (Stripe's ``idempotency_key_in_use``): the core keeps which
    requests it answered, not their answers, so the first answer cannot be sent again.  ``x-should-retry:
    false``: the SDK would otherwise retry a 409 with the same key."""
    response = _error(409, f"A request with this {IDEMPOTENCY_HEADER} was already received: it is being answered "
                      "or was answered. Its answer is not sent twice (nor charged twice); send a new key for a new "
                      "request.", param=IDEMPOTENCY_HEADER, code="idempotency_key_in_use")  # fmt: skip
    response.headers["x-should-retry"] = "false"
    return response


def _refusal(final: Final) -> web.Response:
    status, kind, code = STATUS.get(final.meta.get("reason", ""), STATUS["unavailable"])
    return _error(status, final.text, kind, code=code, retry_after_s=final.meta.get("retry_after_s"))


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    """Bearer key → the key's owner (401 without one); one log line names the key id, never the key."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return _error(401, "Send an API key: Authorization: Bearer KEY (minigpt4-bot admin keys create).",
                      code="invalid_api_key")  # fmt: skip
    try:
        owner = await request.app[CORE_KEY].verify_api_key(PLATFORM, key.strip())
    except Exception as exc:
        log.error("openai: could not check an API key (database): %r", type(exc).__name__)
        return _error(503, "The bot cannot check keys right now; try again shortly.", "server_error",
                      retry_after_s=5)  # fmt: skip
    if owner is None:
        log.info("openai: refused a request with an unknown or revoked key from %s", request.remote)
        return _error(401, "Incorrect or revoked API key.", code="invalid_api_key")
    request[OWNER_KEY] = owner
    return await handler(request)


def create_app(core: Core, settings: Any, *, address_allowed: AddressPolicy = is_public_address) -> web.Application:
    """The API for one core; ``settings`` is the ``[openai]`` table.  ``address_allowed`` decides where
    remote pictures may be fetched from (tests narrow it; production: public addresses only)."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_auth])
    app[CORE_KEY] = core
    app[CONFIG_KEY] = {"settings": settings}
    limits = core.image_limits
    app[IMAGES_KEY] = RemoteImages(max_bytes=limits.max_bytes, timeout_s=settings.fetch_timeout_s,
                                   max_redirects=settings.max_redirects, allowed=address_allowed)  # fmt: skip
    app.on_cleanup.append(_close_images)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model}", _model)
    app.router.add_post("/v1/chat/completions", _chat)
    return app


async def _close_images(app: web.Application) -> None:
    await app[IMAGES_KEY].close()


# ----------------------------------------------------------------------------- models


def _model_ids(request: web.Request) -> dict[str, str | None]:
    """Model id → the preset it asks with (``None``: as written)."""
    base = request.app[CONFIG_KEY]["settings"].model_id
    owner = request[OWNER_KEY]
    ids: dict[str, str | None] = {base: None}
    ids.update({f"{base}:{p.name}": p.name for p in request.app[CORE_KEY].presets(owner.workspace, _channel(owner))})
    return ids


def _channel(owner: ApiKeyOwner) -> str:
    """Each key is its own channel: its conversations stay apart, and a channel rule can target one key."""
    return f"key-{owner.key_id}"


async def _model_entries(request: web.Request) -> list[dict[str, Any]]:
    core = request.app[CORE_KEY]
    facts = (await core.health()).model
    gen = core.generation_defaults
    entries = []
    for model_id, preset in _model_ids(request).items():
        entries.append({
            "id": model_id, "object": "model", "created": 0, "owned_by": "minigpt4-bot",
            "variant": facts.get("variant"), "max_model_len": gen.max_length, "context_length": gen.max_length,
            "max_output_tokens": gen.max_new_tokens, "preset": preset, "demo_weights": bool(facts.get("demo")),
        })  # fmt: skip
    return entries


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": await _model_entries(request)})


async def _model(request: web.Request) -> web.Response:
    wanted = request.match_info["model"]
    for entry in await _model_entries(request):
        if entry["id"] == wanted:
            return web.json_response(entry)
    return _error(404, f"No model {wanted[:80]!r} here: see GET /v1/models.", param="model", code="model_not_found")


# ----------------------------------------------------------------------------- chat completions


async def _read_json(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest(f"The request is larger than {request.app[CONFIG_KEY]['settings'].max_body_bytes} bytes "
                         "([openai] max_body_bytes).", status=413) from None  # fmt: skip
    try:
        return json.loads(raw) if len(raw) < OFF_LOOP_BYTES else await asyncio.to_thread(json.loads, raw)
    except (ValueError, RecursionError):
        raise BadRequest("The body is not valid JSON.") from None


async def _images(request: web.Request, call: ChatCall) -> dict[str, ImageAttachment]:
    """Every picture URL of the request as an attachment (``data:`` decoded; remote ones fetched only for
    the new message here, the rest when a history needs them: :func:`_fetch_remote`)."""
    limit = request.app[CORE_KEY].image_limits.max_bytes
    found: dict[str, ImageAttachment] = {}
    for message in call.messages:
        for url in message.image_urls:
            if url in found:
                continue
            if url[:5].lower() == "data:":
                part = await asyncio.to_thread(decode_data_url, url, limit) if len(url) > OFF_LOOP_BYTES else (
                    decode_data_url(url, limit))  # fmt: skip
                found[url] = ImageAttachment(part.data or b"", "picture", error=part.error)
            elif url[:7].lower() != "http://" and url[:8].lower() != "https://":
                raise BadRequest("A picture must be a data: URL or an http(s) URL.", "messages")
    return found


async def _fetch_remote(request: web.Request, messages: list[Message], found: dict[str, ImageAttachment]) -> None:
    settings = request.app[CONFIG_KEY]["settings"]
    remote = [u for m in messages for u in m.image_urls if u not in found]
    if remote and not settings.fetch_remote_images:
        raise BadRequest("Remote picture URLs are not fetched here ([openai] fetch_remote_images is off): send "
                         "pictures as data: URLs.", "messages", code="remote_images_disabled")  # fmt: skip
    fetched = await asyncio.gather(*(request.app[IMAGES_KEY].fetch(u) for u in dict.fromkeys(remote)))
    found.update(zip(dict.fromkeys(remote), fetched, strict=True))


def _digests(found: dict[str, ImageAttachment]) -> dict[str, str]:
    return {u: hashlib.sha256(a.data).hexdigest() for u, a in found.items() if a.error is None}


async def _bot_request(request: web.Request, call: ChatCall) -> Request:
    """The core request: the thread this conversation is stored in, the new message, and a history when
    the stored thread does not hold the client's earlier messages."""
    owner, core = request[OWNER_KEY], request.app[CORE_KEY]
    ids = _model_ids(request)
    if call.model not in ids:
        raise BadRequest(f"No model {call.model[:80]!r} here: see GET /v1/models.", "model", "model_not_found", 404)
    found = await _images(request, call)
    tail = len(call.messages)
    while tail > 0 and call.messages[tail - 1].role == "user":
        tail -= 1
    new = call.messages[tail:]
    await _fetch_remote(request, new, found)
    channel = _channel(owner)
    placement = await place(core, owner.key_id, owner.workspace, channel, call, _digests(found))
    preset = ids[call.model]
    history = None
    if placement.seed is not None:
        await _fetch_remote(request, placement.seed, found)
        history = tuple(HistoryTurn(m.role, _preset_text(m.text, preset, i == 0),  # type: ignore[arg-type]
                                    tuple(found[u] for u in m.image_urls))
                        for i, m in enumerate(placement.seed))  # fmt: skip
    text = "\n\n".join(m.text for m in new if m.text)
    return Request(
        platform=PLATFORM, workspace=owner.workspace, channel=channel, thread=placement.ref.thread,
        user=owner.user, text=text, images=tuple(found[u] for m in new for u in m.image_urls),
        preset=preset if tail == 0 else None, generation=call.generation, history=history,
        event_id=idempotency_event(owner, request.headers.get(IDEMPOTENCY_HEADER)), retry_refused=True,
    )  # fmt: skip


def idempotency_event(owner: ApiKeyOwner, key: str | None) -> str | None:
    """The core's event id for an ``Idempotency-Key``: the core's dedup step then answers (and charges) a
    client's retry once.  Scoped to the key's user and workspace, so two users' keys never collide; hashed,
    so a key of any length fits the stored id."""
    if key is None or not key.strip():
        return None
    raw = "\0".join((owner.workspace, owner.user, key.strip()))
    return "idem-" + hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()


def _preset_text(text: str, preset: str | None, first: bool) -> str:
    """A ``minigpt4:PRESET`` conversation asks its first message with the preset: so does its history."""
    return f"/{preset} {text}".strip() if preset and first and not text.lstrip().startswith(("/", "!")) else text


def _usage(meta: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = int(meta.get("prompt_tokens", 0)), int(meta.get("tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": int(meta.get("cached_prompt_tokens", 0))}}  # fmt: skip


def _finish(meta: dict[str, Any]) -> str:
    return "length" if meta.get("finish_reason") == "length" else "stop"


async def _chat(request: web.Request) -> web.StreamResponse:
    try:
        call = parse_body(await _read_json(request))
        bot_request = await _bot_request(request, call)
    except BadRequest as exc:
        log.info("openai: bad request from key %s: %s", request[OWNER_KEY].key_id, exc.message)
        return _error(exc.status, exc.message, param=exc.param, code=exc.code)
    replies = request.app[CORE_KEY].handle(bot_request)
    try:
        first = await anext(replies, None)
        if first is None:  # the Idempotency-Key of a request being answered or answered: not answered twice
            return _duplicate()
        if isinstance(first, Final) and "reason" in first.meta:
            return _refusal(first)  # the core gave a refused request's key back: a retry with it is answered
        if call.stream:
            return await _stream(request, call, first, replies)
        return await _complete(call, first, replies)
    finally:
        with contextlib.suppress(Exception):  # closing early interrupts the answer (the client left)
            await replies.aclose()


async def _complete(call: ChatCall, event: ReplyEvent, replies: AsyncIterator[ReplyEvent]) -> web.Response:
    while not isinstance(event, Final):
        event = await anext(replies)
    if "reason" in event.meta:  # failed after it began: no partial answer is passed off as complete
        return _refusal(event)
    body = {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": call.model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": event.text, "refusal": None},
                     "finish_reason": _finish(event.meta), "logprobs": None}],
        "usage": _usage(event.meta),
    }  # fmt: skip
    return web.json_response(body)


async def _stream(
    request: web.Request, call: ChatCall, event: ReplyEvent, replies: AsyncIterator[ReplyEvent]
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": call.model, "system_fingerprint": None}  # fmt: skip
    usage_none = {"usage": None} if call.include_usage else {}

    async def send(data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        await response.write(f"data: {text}\n\n".encode())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                **usage_none}  # fmt: skip

    await response.prepare(request)
    try:
        await send(chunk({"role": "assistant", "content": ""}))
        shown = streamed = ""
        while True:
            if isinstance(event, Delta):  # held from a box's first token on: the final text is the cleaned one
                streamed += event.text
                if len(ready := streamed[: settled(streamed)]) > len(shown):
                    await send(chunk({"content": ready[len(shown) :]}))
                    shown = ready
            elif "reason" in event.meta:
                _status, kind, code = STATUS.get(event.meta["reason"], STATUS["unavailable"])
                await send(error_body(event.text, kind, code=code))
                break
            else:
                if event.text.startswith(shown) and event.text != shown:  # notes the final text adds
                    await send(chunk({"content": event.text[len(shown) :]}))
                elif not shown:
                    await send(chunk({"content": event.text}))
                await send(chunk({}, _finish(event.meta)))
                if call.include_usage:
                    await send({**base, "choices": [], "usage": _usage(event.meta)})
                break
            event = await anext(replies)
        await send("[DONE]")
        await response.write_eof()
    except ConnectionError as exc:
        log.info("openai: client of key %s left mid-answer: %s", request[OWNER_KEY].key_id, exc)
    return response
