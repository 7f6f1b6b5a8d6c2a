"""The read-only API for a reloaded page: a thread's live conversation, the pictures of its turns, the
channel's presets; behind a login proxy a thread is its starter's alone."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from aiohttp import web

from adapters.web.common import (
    CONFIG_KEY,
    DOWNLOAD_TYPE,
    SERVICE_KEY,
    USER_KEY,
    _json_error,
    log,
    shown_type,
    thread_ref,
)
from adapters.web.guard import GUARD_KEY
from bot.core.frontend_api import ThreadView
from bot.core.requests import ThreadRef


def _ref(request: web.Request) -> ThreadRef | None:
    """The thread a read-only API path names, in this chat's channel (``None``: a malformed id)."""
    return thread_ref(request, request.match_info["thread"])


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
    mime = shown_type(picture.mime)
    if mime == DOWNLOAD_TYPE:  # HEIC …: nothing a page could run, but never rendered here
        headers["Content-Disposition"] = f'attachment; filename="{picture.filename}"'
    return web.Response(body=picture.data, content_type=mime, headers=headers)


async def _presets(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    config = request.app[CONFIG_KEY]
    presets = [{"name": p.name, "prompt": p.prompt} for p in service.presets(config["workspace"], config["channel"])]
    return web.json_response({"default": service.default_preset, "presets": presets})
