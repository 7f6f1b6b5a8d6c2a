"""Each step of the request path alone (issue 22 item 3): built from real parts — a real SQLite database,
a scripted backend — and run with :func:`bot.core.pipeline.chain` before a stand-in for the rest of the
chain, so each test checks its step's one concern.  The whole path is tested in test_service.py & co."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.core.commands import Command, ParsedMessage
from bot.core.config import Settings
from bot.core.errors import (
    AccessDenied,
    ImageError,
    ModelUnavailable,
    NoImageError,
    QuotaExceeded,
    UnsupportedRequest,
    UserInputError,
)
from bot.core.pipeline import CUT_NOTE, Context, Parts, chain, steps
from bot.core.pipeline.answer import Extras, Store
from bot.core.pipeline.command import Commands
from bot.core.pipeline.conversation import Conversation, Record
from bot.core.pipeline.guard import Access, Dedup
from bot.core.pipeline.pictures import Pictures
from bot.core.pipeline.question import Options, Presets
from bot.core.pipeline.quota import Quota
from bot.core.pipeline.stream import Stream
from bot.core.requests import Delta, Final, GenerationRequest, ReplyEvent, Request, ThreadRef
from model.engine.contract import FinalEvent, RequestFailed
from storage import Database, sqlite_url
from tests.bot.test_service import png, req
from tests.pg import create_schema
from tests.scripted_backend import ScriptedBackend

NEXT = Final("the rest of the chain", kind="notice")


class Rest:
    """The rest of the chain as a step sees it: records the context it was given, then yields ``NEXT``
    (or runs ``then(ctx)``, an async generator, to stand in for what a later step does)."""

    def __init__(self, then: Callable[[Context], AsyncIterator[ReplyEvent]] | None = None) -> None:
        self.seen: list[Context] = []
        self.then = then

    async def __call__(self, ctx: Context, _call_next: Any) -> AsyncIterator[ReplyEvent]:
        self.seen.append(ctx)
        if self.then is None:
            yield NEXT
            return
        async for event in self.then(ctx):
            yield event


@pytest.fixture
def parts_run(tmp_path: Path) -> Callable[..., Any]:
    """``parts_run(fn, settings=None)``: ``await fn(parts)`` on a fresh SQLite database and a scripted backend."""

    def go(fn: Callable[[Parts], Awaitable[Any]], settings: dict[str, Any] | None = None) -> Any:
        url = sqlite_url(tmp_path / f"steps-{len(list(tmp_path.iterdir()))}.db")
        create_schema(url)

        async def main() -> Any:
            db = Database(url)
            try:
                return await fn(Parts.build(Settings.model_validate(settings or {}), db, ScriptedBackend()))
            finally:
                await db.dispose()

        return asyncio.run(main())

    return go


async def run_steps(ctx: Context, *chain_steps: Any) -> list[ReplyEvent]:
    return [event async for event in chain(chain_steps)(ctx)]


def test_the_path_is_the_documented_chain(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        names = [type(step).__name__ for step in steps(parts)]
        assert names == ["Dedup", "Access", "Commands", "Options", "Pictures", "Conversation", "Presets", "Quota",
                         "Record", "Extras", "Store", "Stream"]  # fmt: skip

    parts_run(fn)


def test_dedup_ends_a_redelivered_event_and_refuses_ids_too_long_to_store(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        rest = Rest()
        first = Context(req("hi", event_id="ev1"))
        assert await run_steps(first, Dedup(parts), rest) == [NEXT] and first.outcome == "answered"
        again = Context(req("hi", event_id="ev1"))
        assert await run_steps(again, Dedup(parts), rest) == [] and again.outcome == "duplicate"
        assert len(rest.seen) == 1
        with pytest.raises(UnsupportedRequest, match="thread of 129"):
            await run_steps(Context(req("hi", thread="t" * 129)), Dedup(parts), rest)

    parts_run(fn)


def test_access_refuses_before_the_rest(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        await parts.db.add_rule("deny", "user", "slack", "mallory")
        rest = Rest()
        with pytest.raises(AccessDenied):
            await run_steps(Context(req("hi", user="mallory")), Access(parts), rest)
        assert rest.seen == [] and await run_steps(Context(req("hi")), Access(parts), rest) == [NEXT]

    parts_run(fn)


def test_commands_answer_commands_and_pass_questions_on(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        rest, db = Rest(), parts.db
        (settings,) = await run_steps(Context(req(thread="", command=Command.SETTINGS, addressed=True)),
                                      Commands(parts), rest)  # fmt: skip
        assert settings.kind == "notice" and "Your limits: " in settings.text
        assert not await db.is_followed(ThreadRef("slack", "T1", "C1", ""))  # a typed settings follows no thread
        (shown,) = await run_steps(Context(req("help")), Commands(parts), rest)
        assert shown.kind == "help" and shown.ephemeral
        conversation = await db.get_or_create_conversation(ThreadRef("slack", "T1", "C1", "t1"))
        await db.add_turns(conversation.id, [{"role": "user", "text": "q"}])
        (reset,) = await run_steps(Context(req("/reset")), Commands(parts), rest)
        assert (
            reset.text.startswith("Starting over")
            and await db.live_conversation(ThreadRef("slack", "T1", "C1", "t1")) is None
        )
        assert rest.seen == []
        asked = Context(req("settings", png(), command=Command.ASK, addressed=True))
        assert await run_steps(asked, Commands(parts), rest) == [NEXT]
        assert asked.parsed == ParsedMessage(question="settings") and await db.is_followed(asked.key)
        with pytest.raises(UserInputError, match="/teleport"):
            await run_steps(Context(req("/teleport")), Commands(parts), rest)

    parts_run(fn)


def test_options_checks_the_request_against_the_generation_bounds(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        ctx = Context(req("hi", generation=GenerationRequest(max_new_tokens=5, temperature=0)))
        assert await run_steps(ctx, Options(parts), Rest()) == [NEXT]
        assert ctx.options["max_new_tokens"] == 5 and ctx.options["do_sample"] is False
        with pytest.raises(UserInputError, match="temperature"):
            await run_steps(Context(req("hi", generation=GenerationRequest(temperature=9))), Options(parts), Rest())

    parts_run(fn)


def test_pictures_are_counted_and_checked(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        ctx = Context(req("hi", png()))
        await run_steps(ctx, Pictures(parts), Rest())
        assert [(c.width, c.height) for c in ctx.checked] == [(40, 30)] and ctx.seeded is None
        with pytest.raises(ImageError, match="at most 1 pictures"):
            await run_steps(Context(req("hi", png(), png())), Pictures(parts), Rest())
        with pytest.raises(ImageError):
            await run_steps(Context(req("hi", b"not a picture")), Pictures(parts), Rest())

    parts_run(fn, {"images": {"max_per_message": 1}})


def test_conversation_reads_the_thread_and_wants_a_picture_somewhere(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        with pytest.raises(NoImageError):
            await run_steps(Context(req("hi")), Conversation(parts), Rest())
        conversation = await parts.db.get_or_create_conversation(ThreadRef("slack", "T1", "C1", "t1"))
        image = await parts.db.add_image(png(), "image/png", 40, 30)
        await parts.db.add_turns(conversation.id, [{"role": "user", "text": "q", "image_id": image}])
        ctx = Context(req("and now?"))
        assert await run_steps(ctx, Conversation(parts), Rest()) == [NEXT]
        assert ctx.conversation.id == conversation.id and [t.text for t in ctx.history] == ["q"]

    parts_run(fn)


def test_presets_make_the_question(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        ctx = Context(req("/story about a cat"), parsed=ParsedMessage(preset="story", question="about a cat"))
        await run_steps(ctx, Presets(parts), Rest())
        assert ctx.question.startswith("Write a short story") and ctx.question.endswith("about a cat")
        with pytest.raises(UserInputError, match="What would you like to know"):
            await run_steps(Context(req("")), Presets(parts), Rest())

    parts_run(fn)


def test_quota_reserves_and_gives_back_what_was_never_stored(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        db, day = parts.db, parts.db.now().replace(hour=0, minute=0, second=0, microsecond=0)

        async def fails(_ctx: Context) -> AsyncIterator[ReplyEvent]:
            raise ModelUnavailable("storing failed")
            yield  # pragma: no cover

        failed = Context(req("hi"))
        with pytest.raises(ModelUnavailable):
            await run_steps(failed, Quota(parts), Rest(fails))
        assert failed.usage_id is not None and (await db.usage_since("slack", "T1", "alice", day)).requests == 0
        admitted = Context(req("hi"))
        assert await run_steps(admitted, Quota(parts), Rest()) == [NEXT]
        assert (await db.usage_since("slack", "T1", "alice", day)).requests == 1
        with pytest.raises(QuotaExceeded):
            await run_steps(Context(req("hi")), Quota(parts), Rest())

    parts_run(fn, {"quotas": {"user": {"requests_per_day": 1}}})


async def _recorded(parts: Parts, text: str = "What is this?") -> Context:
    """A context the steps before the stream have filled: admitted, question and pending answer stored."""
    ctx = Context(req(text, png()), parsed=ParsedMessage(question=text))  # as the command step leaves it
    await run_steps(ctx, Pictures(parts), Conversation(parts), Presets(parts), Quota(parts), Record(parts), Rest())
    return ctx


def test_record_stores_the_question_and_a_pending_answer(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        ctx = await _recorded(parts)
        stored = await parts.db.turns(ctx.conversation.id)
        assert [(t.role, t.status, t.text) for t in stored] == [("user", "done", "What is this?"),
                                                                ("assistant", "pending", "")]  # fmt: skip
        assert ctx.answer_turn == stored[1].id and stored[0].image_id is not None
        assert ctx.turns == [{"role": "user", "text": "What is this?", "image": True}] and len(ctx.images) == 1

    parts_run(fn)


def test_stream_streams_the_backend_into_the_context(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        ctx = await _recorded(parts)
        events = await run_steps(ctx, Stream(parts))
        assert "".join(e.text for e in events if isinstance(e, Delta)) == "A red circle."
        assert isinstance(ctx.streamed.final, FinalEvent) and ctx.streamed.generated == 3
        assert [t.status for t in await parts.db.turns(ctx.conversation.id)][-1] == "streaming"
        parts.backend.fail = RequestFailed("engine down")
        failing = await _recorded(parts, "again?")
        with pytest.raises(ModelUnavailable):
            await run_steps(failing, Stream(parts))
        assert "engine down" in (failing.streamed.error or "")

    parts_run(fn)


def test_store_writes_the_answer_and_settles_the_reservation(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        db, day = parts.db, parts.db.now().replace(hour=0, minute=0, second=0, microsecond=0)
        ctx = await _recorded(parts)
        *_deltas, final = await run_steps(ctx, Store(parts), Stream(parts))
        assert final.kind == "answer" and final.text == "A red circle." and final.meta["turn_id"] == ctx.answer_turn
        answer = (await db.turns(ctx.conversation.id))[-1]
        assert (answer.status, answer.text, answer.completion_tokens) == ("done", "A red circle.", 3)
        assert (await db.usage_since("slack", "T1", "alice", day)).tokens == 3

        parts.backend.fail = RequestFailed("engine down")
        failing = await _recorded(parts, "again?")
        with pytest.raises(ModelUnavailable):
            await run_steps(failing, Store(parts), Stream(parts))
        answer = (await db.turns(failing.conversation.id))[-1]
        assert answer.status == "failed" and "engine down" in answer.error
        assert (await db.usage_since("slack", "T1", "alice", day)).requests == 1  # the failed one given back

    parts_run(fn)


def test_extras_add_the_cut_note_once_per_thread(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        async def cut(_ctx: Context) -> AsyncIterator[ReplyEvent]:
            yield Final("An answer.", meta={"context_cut": True})

        (first,) = await run_steps(Context(req("q")), Extras(parts), Rest(cut))
        assert first.text == f"An answer.\n\n{CUT_NOTE}"
        (later,) = await run_steps(Context(req("q"), told_cut=True), Extras(parts), Rest(cut))
        assert later.text == "An answer."

    parts_run(fn)


def test_a_request_the_core_cleaned_runs_the_whole_chain(parts_run) -> None:
    async def fn(parts: Parts) -> None:
        ctx = Context(Request("slack", "T1", "C1", "t1", "alice", "What is this?", req("", png()).images))
        *_, final = await run_steps(ctx, *steps(parts))
        assert final.kind == "answer" and ctx.outcome == "answered"

    parts_run(fn)
