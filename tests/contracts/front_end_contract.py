"""The front-end contract suite: what every front end (web, Slack, Discord, the OpenAI API, the next one) must
do for its users, whatever the platform — run against the real client library and the platform's fake.

Like transformers' ``ModelTesterMixin``: a front end's test module defines a class deriving from
:class:`FrontEndContract` whose ``running`` starts the front end (with the platform's own test helper) on
a real :class:`~bot.core.service.BotService` over the scripted backend and yields a small
:class:`FrontEndDriver`: send a picture and a question, send a follow-up, send a refused picture, read what
the user saw.  Each check runs once per front end:

- a picture and a question are answered, and the answer is streamed (the user saw it grow);
- a follow-up continues the conversation: the backend reads the whole thread, with its picture;
- a picture the core refuses gives the user a clear message, and nothing is generated;
- a user over a request quota gets the quota's refusal through the platform, and no conversation is stored;
- the core is closed at the end (``BotService.close``: it takes itself off the worker list).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import func, select

from bot.core.service import BotService
from storage import Database
from storage.tables import Conversation, UsageEntry
from tests.pictures import png
from tests.scripted_backend import ScriptedBackend

__all__ = ["ANSWER", "FrontEndContract", "FrontEndDriver", "Reply", "scripted"]

ANSWER = "A red square on a white table, seen from above."
FOLLOW_UP = "It is about as big as a hand."
NOT_A_PICTURE = b"\x89PNG not really"  # passes a front end's type check; the core cannot decode it


def scripted() -> ScriptedBackend:
    """The answers the contract expects, streamed in pieces slowly enough for every platform to show them grow."""
    backend = ScriptedBackend(ANSWER, piece=8, delay=0.12)
    backend.script = [ANSWER, FOLLOW_UP]
    return backend


@dataclass(frozen=True)
class Reply:
    """An answer as the user saw it: every version shown, in order (the last is the answer)."""

    versions: list[str]

    @property
    def text(self) -> str:
        return self.versions[-1]


async def _users_and_conversations(url: str) -> tuple[list[tuple[str, str, str]], int]:
    """Who has been charged so far (platform, workspace, user: as this front end names its user), and how many
    conversations are stored."""
    db = Database(url)
    try:
        async with db.sessions() as session:
            users = (await session.execute(select(UsageEntry.platform, UsageEntry.workspace, UsageEntry.user_id))).all()
            conversations = await session.scalar(select(func.count()).select_from(Conversation))
    finally:
        await db.dispose()
    return sorted({(p, w, u) for p, w, u in users}), int(conversations or 0)


async def _limit_requests(url: str, user: tuple[str, str, str], per_day: int) -> None:
    db = Database(url)
    try:
        await db.set_quota("user", *user, requests_per_day=per_day)
    finally:
        await db.dispose()


class FrontEndDriver(Protocol):
    """One front end, started, as a user drives it; it remembers the conversation ``ask`` started."""

    service: BotService
    database_url: str
    names_files: bool  # attachments have file names on this platform (a refusal names the file)

    async def ask(self, question: str, picture: bytes) -> Reply:
        """A new conversation: ``picture`` and ``question``; returns once the answer is complete."""
        ...

    async def follow_up(self, question: str) -> Reply:
        """The next message in the conversation ``ask`` started; returns once its answer is complete."""
        ...

    async def refused(self, question: str, data: bytes, filename: str) -> str:
        """A new conversation with an attachment, which the core refuses (the attachment, or the user's quota);
        the message the user got."""
        ...


class FrontEndContract:
    """Derive a test class from this and implement :meth:`running`."""

    def running(self, folder: Path, backend: ScriptedBackend) -> contextlib.AbstractAsyncContextManager[Any]:
        """The front end started on a fresh database and ``backend``, as an async context yielding its driver."""
        raise NotImplementedError

    def test_contract_a_picture_and_question_are_answered_streamed_and_followed_up(self, tmp_path: Path) -> None:
        async def main() -> None:
            backend = scripted()
            async with self.running(tmp_path, backend) as driver:
                picture = png()
                first = await driver.ask("What is in this picture?", picture)
                assert first.text == ANSWER
                assert len(first.versions) >= 2 and first.versions[0] != ANSWER  # streamed: seen before it was whole
                assert backend.calls[0]["images"] == [picture]

                second = await driver.follow_up("Is it big?")
                assert second.text == FOLLOW_UP
                call = backend.calls[-1]
                assert [t["role"] for t in call["turns"]] == ["user", "assistant", "user"]
                assert call["turns"][1]["text"] == ANSWER and call["turns"][-1]["text"].endswith("Is it big?")
                assert call["images"] == [picture]  # the thread's picture, read again for the follow-up

        asyncio.run(main())

    def test_contract_a_refused_picture_gets_a_clear_message(self, tmp_path: Path) -> None:
        async def main() -> None:
            backend = scripted()
            async with self.running(tmp_path, backend) as driver:
                message = await driver.refused("What is this?", NOT_A_PICTURE, "broken.png")
                assert "not an image I can read" in message, message
                assert "broken.png" in message or not driver.names_files, message
                assert backend.calls == []  # nothing generated, nothing charged

        asyncio.run(main())

    def test_contract_a_user_over_the_request_quota_is_refused_and_nothing_is_stored(self, tmp_path: Path) -> None:
        async def main() -> None:
            backend = scripted()
            async with self.running(tmp_path, backend) as driver:
                await driver.ask("What is in this picture?", png())  # one request, charged to this user
                [user], conversations = await _users_and_conversations(driver.database_url)
                await _limit_requests(driver.database_url, user, per_day=1)
                message = await driver.refused("And what is in this one?", png(), "second.png")
                assert "reached the limit of 1 requests per day" in message, message
                assert (await _users_and_conversations(driver.database_url))[1] == conversations == 1
                assert len(backend.calls) == 1  # nothing generated for the refused request

        asyncio.run(main())

    def test_contract_the_core_is_closed_at_the_end(self, tmp_path: Path) -> None:
        async def main() -> None:
            async with self.running(tmp_path, scripted()) as driver:
                await driver.service.recover()  # registers this process as a worker, as serve does at start-up
                url, worker = driver.database_url, driver.service.worker.id
            db = Database(url)
            try:
                assert worker not in [row.id for row in await db.workers()]
            finally:
                await db.dispose()

        asyncio.run(main())
