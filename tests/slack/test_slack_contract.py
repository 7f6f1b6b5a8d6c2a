"""The front-end contract suite (``tests/contracts/front_end_contract.py``) on Slack: real slack_bolt in Socket
Mode against the fake Slack, through ``slack_env``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from slack_helpers import CHANNEL, Env, slack_env

from tests.contracts.front_end_contract import FrontEndContract, Reply
from tests.scripted_backend import ScriptedBackend


class SlackDriver:
    names_files = True

    def __init__(self, env: Env) -> None:
        self.env, self.fake = env, env.fake
        self.service, self.database_url = env.service, env.url
        self.root, self.answers = "", 0

    def _last_reply(self) -> Reply:
        reply = self.fake.bot_replies(CHANNEL, self.root)[-1]
        return Reply([text for _, text in reply.edits])

    async def ask(self, question: str, picture: bytes) -> Reply:
        mention = self.fake.mention(CHANNEL, question, files=[self.fake.add_file(picture)])
        await self.fake.wait_ack(await self.fake.send_event(mention))
        self.root, self.answers = mention["ts"], 1
        await self.env.answered(self.root)
        return self._last_reply()

    async def follow_up(self, question: str) -> Reply:
        await self.fake.wait_ack(await self.fake.send_event(self.fake.user_message(CHANNEL, question,
                                                                                   thread_ts=self.root)))  # fmt: skip
        self.answers += 1
        await self.env.answered(self.root, answers=self.answers)
        return self._last_reply()

    async def refused(self, question: str, data: bytes, filename: str) -> str:
        seen = len(self.fake.ephemerals)
        mention = self.fake.mention(CHANNEL, question, files=[self.fake.add_file(data, name=filename)])
        await self.fake.send_event(mention)
        await self.fake.wait_for(lambda: len(self.fake.ephemerals) > seen)
        return self.fake.ephemerals[-1]["text"]


class TestSlackFrontEnd(FrontEndContract):
    @contextlib.asynccontextmanager
    async def running(self, folder: Path, backend: ScriptedBackend) -> AsyncIterator[SlackDriver]:
        async with slack_env(folder, backend=backend) as env:
            yield SlackDriver(env)
