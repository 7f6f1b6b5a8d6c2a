"""The front-end contract suite (``tests/contracts/front_end_contract.py``) on the web chat: its JSON/SSE API
(``POST /api/messages``, what the page's script calls) on a test server, with the page's own form fields."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from web_helpers import make_settings, parse_sse

from adapters.web import create_app
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests.contracts.front_end_contract import FrontEndContract, Reply
from tests.scripted_backend import ScriptedBackend


class WebDriver:
    names_files = True

    def __init__(self, client: TestClient, service: BotService, url: str) -> None:
        self.client, self.service, self.database_url = client, service, url
        self.thread = ""

    async def _post(self, text: str, image: tuple[str, bytes] | None = None) -> list[tuple[str, dict[str, Any]]]:
        data = aiohttp.FormData(default_to_multipart=True)
        for name, value in (("thread", self.thread), ("text", text), ("preset", ""), ("user", "tester"),
                            ("event_id", uuid.uuid4().hex)):  # fmt: skip
            data.add_field(name, value)
        if image is not None:
            data.add_field("image", image[1], filename=image[0], content_type="image/png")
        response = await self.client.post("/api/messages", data=data)
        assert response.status == 200, await response.text()
        return parse_sse(await response.text())

    async def _answer(self, text: str, image: tuple[str, bytes] | None = None) -> Reply:
        events = await self._post(text, image)
        versions, shown = [], ""
        for name, data in events:
            if name == "delta":
                shown += data["text"]
                versions.append(shown)
        final = events[-1][1]
        assert events[-1][0] == "final" and final["kind"] == "answer", events
        return Reply([*versions, final["text"]])

    async def ask(self, question: str, picture: bytes) -> Reply:
        self.thread = f"contract-{uuid.uuid4().hex[:6]}"
        return await self._answer(question, ("picture.png", picture))

    async def follow_up(self, question: str) -> Reply:
        return await self._answer(question)

    async def refused(self, question: str, data: bytes, filename: str) -> str:
        self.thread = f"contract-{uuid.uuid4().hex[:6]}"
        events = await self._post(question, (filename, data))
        # a picture it cannot read is a notice, a quota an error: either way the final event, and no answer
        assert events[-1][0] == "final" and events[-1][1]["kind"] in ("notice", "error"), events
        return events[-1][1]["text"]


class TestWebFrontEnd(FrontEndContract):
    @contextlib.asynccontextmanager
    async def running(self, folder: Path, backend: ScriptedBackend) -> AsyncIterator[WebDriver]:
        url = sqlite_url(folder / f"web-{uuid.uuid4().hex[:8]}.db")
        db = Database(url)
        await db.create_all()
        service = BotService(make_settings(), db, backend)
        client = TestClient(TestServer(create_app(service)))
        await client.start_server()
        try:
            yield WebDriver(client, service, url)
        finally:
            await client.close()
            await service.close()
            await db.dispose()
