"""The front-end contract suite (``tests/contracts/front_end_contract.py``) on the OpenAI-compatible API: the
real ``openai`` SDK, streaming, against the API server on loopback, through ``running_api``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
from openai_helpers import Api, assistant, data_url, running_api, user

from tests.contracts.front_end_contract import FrontEndContract, Reply
from tests.scripted_backend import ScriptedBackend


class OpenAIDriver:
    """A chat client as Open WebUI is one: every request sends the whole conversation so far."""

    names_files = False  # a data: URL has no file name

    def __init__(self, api: Api) -> None:
        self.api, self.client = api, api.client()
        self.service, self.database_url = api.service, api.db.url
        self.messages: list[dict[str, Any]] = []

    async def _send(self) -> Reply:
        stream = await self.client.chat.completions.create(model="minigpt4", messages=self.messages, stream=True)
        versions, text = [], ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                versions.append(text)
        self.messages.append(assistant(text))
        return Reply(versions)

    async def ask(self, question: str, picture: bytes) -> Reply:
        self.messages = [user(question, data_url(picture))]
        return await self._send()

    async def follow_up(self, question: str) -> Reply:
        self.messages.append(user(question))
        return await self._send()

    async def refused(self, question: str, data: bytes, filename: str) -> str:
        try:
            await self.client.chat.completions.create(model="minigpt4", messages=[user(question, data_url(data))])
        except (openai.BadRequestError, openai.RateLimitError) as exc:  # a picture it cannot read; a quota
            body = exc.body if isinstance(exc.body, dict) else json.loads(exc.response.text)
            return str(body.get("message") or body["error"]["message"])
        raise AssertionError("the API answered a request the core refuses")


class TestOpenAIFrontEnd(FrontEndContract):
    @contextlib.asynccontextmanager
    async def running(self, folder: Path, backend: ScriptedBackend) -> AsyncIterator[OpenAIDriver]:
        async with running_api(folder, backend) as api:
            yield OpenAIDriver(api)
