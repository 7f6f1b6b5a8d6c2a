"""The front-end contract suite (``tests/contracts/front_end_contract.py``) on Discord: real discord.py against
the fake Discord, through ``discord_env``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from discord_helpers import Env, discord_env

from tests.contracts.front_end_contract import FrontEndContract, Reply
from tests.scripted_backend import ScriptedBackend


class DiscordDriver:
    names_files = True

    def __init__(self, env: Env) -> None:
        self.env, self.fake = env, env.fake
        self.service, self.database_url = env.service, env.url
        self.thread, self.answers = 0, 0

    def _last_reply(self) -> Reply:
        return Reply([text for _, text in self.fake.bot_messages(self.thread)[-1].edits])

    async def ask(self, question: str, picture: bytes) -> Reply:
        _message, self.thread = await self.fake.picture_question(picture, question)
        self.answers = 1
        await self.env.answered(self.thread, shown_in=self.thread)
        return self._last_reply()

    async def follow_up(self, question: str) -> Reply:
        await self.fake.send(self.fake.user_message(self.thread, question))
        self.answers += 1
        await self.env.answered(self.thread, answers=self.answers, shown_in=self.thread)
        return self._last_reply()

    async def refused(self, question: str, data: bytes, filename: str) -> str:
        general = self.fake.general
        seen = len(self.fake.bot_messages(general))
        attachment = self.fake.add_attachment(data, filename)
        await self.fake.send(self.fake.user_message(general, question, mention=True, attachments=[attachment]))
        replies = await self.fake.wait_for(lambda: len(self.fake.bot_messages(general)) > seen and
                                           self.fake.bot_messages(general))  # fmt: skip
        return replies[-1].content


class TestDiscordFrontEnd(FrontEndContract):
    @contextlib.asynccontextmanager
    async def running(self, folder: Path, backend: ScriptedBackend) -> AsyncIterator[DiscordDriver]:
        async with discord_env(folder, backend=backend) as env:
            yield DiscordDriver(env)
