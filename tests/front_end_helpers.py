"""What the front-end tests of answers with files share (tests/grounding/, tests/render/): the web chat on a
test server over a real :class:`BotService` (a message posted, its final SSE event read) and the terminal
chat fed scripted lines.  Each closes the service and its database at the end, as ``serve`` does."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from rich.console import Console

from adapters.terminal import TerminalChat
from adapters.web import create_app
from bot.core.service import BotService
from storage import Database

__all__ = ["final_event", "terminal_chat", "typed_lines", "web_chat", "web_form"]


def web_form(
    thread: str, text: str, event_id: str, picture: bytes | None = None, filename: str = "picture.png", **fields: str
) -> aiohttp.FormData:
    """The web page's form for one message (``fields``: more form fields, e.g. ``user``)."""
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in (("thread", thread), ("text", text), *fields.items(), ("event_id", event_id)):
        form.add_field(name, value)
    if picture is not None:
        form.add_field("image", picture, filename=filename, content_type="image/png")
    return form


def final_event(body: str) -> dict[str, Any]:
    """The data of the ``final`` event of a ``POST /api/messages`` answer."""
    finals = [json.loads(block.split("data: ", 1)[1]) for block in body.split("\n\n") if "event: final" in block]
    return finals[0]


def typed_lines(lines: Iterable[str]) -> Callable[[str], str]:
    """A ``read_line`` for :class:`TerminalChat`: the user types ``lines``, then ends the input (EOF)."""
    typed = iter(lines)

    def read_line(_prompt: str) -> str:
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    return read_line


@contextlib.asynccontextmanager
async def web_chat(service: BotService, db: Database) -> AsyncIterator[TestClient]:
    """A client of the web chat's app over ``service``; the client, the service and ``db`` close afterwards."""
    client = TestClient(TestServer(create_app(service)))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await service.close()
        await db.dispose()


async def terminal_chat(service: BotService, db: Database, console: Console, files_dir: Path, *lines: str) -> None:
    """The terminal chat typing ``lines``, then end of input; ``service`` and ``db`` close afterwards."""
    chat = TerminalChat(service.handle, console, typed_lines(lines), user="tester", files_dir=files_dir)
    try:
        await chat.run()
    finally:
        await service.close()
        await db.dispose()
