"""A thread cut from the left tells the user once (issue 26, item 11): when the thread no longer fits
``max_length`` and its oldest part is cut (the reference's rule), the first such answer carries a note; and
the core's replies carry no literal backticks for the plain-text front ends."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.core.config import Settings
from bot.core.requests import Final, ThreadRef
from bot.core.service import CUT_NOTE, BotService
from model.engine import Engine
from model.engine.contract import FinalEvent, TokenEvent
from model.engine.local_backend import EngineBackend
from storage import Database, sqlite_url
from tests.bot import test_service
from tests.bot.test_service import Harness, png, req
from tests.scripted_backend import ScriptedBackend

run = test_service.run  # the core on SQLite and on PostgreSQL, with a scripted backend
CUT = {"generation": {"max_new_tokens": 300, "max_length": 360}}  # prompts are kept up to 60 tokens


class GrowingBackend(ScriptedBackend):
    """Reports prompt tokens as the engine does: 20 a turn, at most ``max_length - max_new_tokens`` kept."""

    async def stream(self, **kw: Any) -> AsyncIterator[TokenEvent | FinalEvent]:
        options = kw["options"]
        kept = options["max_length"] - options["max_new_tokens"]
        async for event in super().stream(**kw):
            if isinstance(event, FinalEvent):
                event = dataclasses.replace(event, prompt_tokens=min(20 * len(kw["turns"]), kept))
            yield event


def test_the_first_answer_of_a_cut_thread_says_so_once(run):
    async def fn(h: Harness):
        h.service._backend = h.backend = GrowingBackend()
        first = (await h.ask(req("What is this?", png())))[-1]
        assert first.text == "A red circle." and not first.meta["context_cut"]
        second = (await h.ask(req("And the colour?")))[-1]  # 3 turns: 60 tokens, the limit
        assert second.meta["context_cut"] and second.text == f"A red circle.\n\n{CUT_NOTE}"
        third = (await h.ask(req("And now?")))[-1]
        assert third.meta["context_cut"] and third.text == "A red circle."  # told once
        assert all(CUT_NOTE not in t.text for t in await h.turns())  # a note to the user, not thread history
        await h.ask(req("reset"))
        fresh = (await h.ask(req("What is this?", png())))[-1]
        assert fresh.text == "A red circle."

    run(fn, CUT)


def test_the_core_replies_without_literal_backticks(run):
    async def fn(h: Harness):
        texts = [e.text for e in await h.ask(req("What is this?"))]  # no picture yet
        texts += [e.text for e in await h.ask(req("help"))]
        texts += [e.text for e in await h.ask(req("/teleport", png()))]
        assert texts and all("`" not in t for t in texts), texts

    run(fn)


def test_with_the_real_engine_the_note_comes_when_the_engine_cuts(
    demo_models: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The demo weights on the engine: the answer that says so is the one whose context the engine cut."""
    engine = Engine(demo_models["vicuna0"]).start()

    async def main() -> None:
        db = Database(sqlite_url(tmp_path / "cut.db"))
        await db.create_all()
        try:
            generation = {"do_sample": False, "max_new_tokens": 4}
            roomy = BotService(Settings.model_validate({"generation": generation}), db, EngineBackend(engine))
            assert [e async for e in roomy.handle(req("What is this?", png()))][-1].kind == "answer"
            conversation = await db.live_conversation(ThreadRef("slack", "T1", "C1", "t1"))
            (_, answer) = await db.turns(conversation.id)
            fits = answer.prompt_tokens + 4 + 2  # this thread fits; one more turn does not
            tight = Settings.model_validate({"generation": {**generation, "max_length": fits}})
            service = BotService(tight, db, EngineBackend(engine))
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="model.engine.runner"):
                second = [e async for e in service.handle(req("And what colour is it, please?"))][-1]
            assert isinstance(second, Final) and "context cut by" in caplog.text
            assert second.text.endswith(CUT_NOTE)
            third = [e async for e in service.handle(req("And the shape of it, please?"))][-1]
            assert CUT_NOTE not in third.text
        finally:
            await db.dispose()

    try:
        asyncio.run(main())
    finally:
        engine.stop()
