"""The core seam the API front end needs, on SQLite and PostgreSQL with the scripted backend: per-request
answer options checked against [generation], usage in the answer's meta, a reason (and retry_after_s) on
refusals, a thread seeded with the client's history, pictures' digests in thread views, API keys."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from PIL import Image

from bot.core.config import Settings
from bot.core.requests import Final, GenerationRequest, HistoryTurn, ImageAttachment, Request, ThreadRef
from bot.core.service import BotService
from model.engine.contract import Busy
from storage import Database
from tests.scripted_backend import ScriptedBackend

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def png(color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def ask(text: str = "", *images: bytes, thread: str = "t", **kw: Any) -> Request:
    return Request("openai", "acme", "key-1", thread, "alice", text, tuple(ImageAttachment(i) for i in images), **kw)


@pytest.fixture
def run(db_url: str) -> Any:
    """``run(async_fn(service, db, backend), settings=None)`` on a fresh database with a pinned clock."""
    import asyncio

    def go(fn: Any, settings: dict | None = None) -> Any:
        async def main() -> Any:
            db = Database(db_url, clock=lambda: NOW)
            backend = ScriptedBackend("A red square.")
            service = BotService(Settings.model_validate(settings or {}), db, backend)
            try:
                return await fn(service, db, backend)
            finally:
                await db.dispose()

        return asyncio.run(main())

    return go


async def final(service: BotService, request: Request) -> Final:
    events = [e async for e in service.handle(request)]
    assert isinstance(events[-1], Final)
    return events[-1]


def test_generation_options_reach_the_backend_and_bad_ones_are_refused_before_anything(run: Any) -> None:
    async def main(service: BotService, db: Database, backend: ScriptedBackend) -> None:
        wanted = GenerationRequest(max_new_tokens=7, temperature=0.0, top_p=0.5, stop=("END",), seed=42)
        answer = await final(service, ask("what?", png(), generation=wanted))
        assert answer.kind == "answer"
        options = backend.calls[-1]["options"]
        assert options["max_new_tokens"] == 7 and options["do_sample"] is False and options["top_p"] == 0.5
        assert options["stop_sequences"] == ["END"] and options["seed"] == 42
        await final(service, ask("more?", generation=GenerationRequest(temperature=0.7)))
        assert backend.calls[-1]["options"]["do_sample"] is True and backend.calls[-1]["options"]["temperature"] == 0.7
        await final(service, ask("again?"))
        assert backend.calls[-1]["options"] == Settings().generation.model_dump()  # nothing asked: [generation]

        calls = len(backend.calls)
        bad = [
            GenerationRequest(max_new_tokens=301),  # above [generation] max_new_tokens (300)
            GenerationRequest(max_new_tokens=0),
            GenerationRequest(temperature=-0.1),
            GenerationRequest(temperature=9),
            GenerationRequest(top_p=0),
            GenerationRequest(top_p=1.5),
            GenerationRequest(stop=("a", "b", "c", "d", "e")),
            GenerationRequest(stop=("",)),
            GenerationRequest(seed=-1),
            GenerationRequest(seed=True),
        ]
        for options in bad:
            refused = await final(service, ask("q", png((1, 2, 3)), thread="bad", generation=options))
            assert refused.kind == "notice" and refused.meta["reason"] == "bad_input", options
        assert len(backend.calls) == calls
        assert await db.live_conversation(ThreadRef("openai", "acme", "key-1", "bad")) is None
        usage = await db.usage_since("openai", "acme", "alice", NOW - timedelta(days=1))
        assert usage.requests == 3  # refused requests are not charged

    run(main)


def test_answer_meta_reports_token_usage(run: Any) -> None:
    async def main(service: BotService, _db: Database, _backend: ScriptedBackend) -> None:
        answer = await final(service, ask("what?", png()))
        assert answer.meta["prompt_tokens"] == 10 and answer.meta["tokens"] == 3
        assert answer.meta["cached_prompt_tokens"] == 0 and answer.meta["finish_reason"] == "eos"

    run(main)


def test_refusals_say_why_and_when_to_retry(run: Any) -> None:
    async def main(service: BotService, db: Database, backend: ScriptedBackend) -> None:
        assert (await final(service, ask("no picture yet"))).meta == {"reason": "bad_input"}
        backend.fail = Busy("queue full", 7.0)
        busy = await final(service, ask("q", png()))
        assert busy.meta == {"reason": "busy", "retry_after_s": 7.0}
        backend.fail = None
        await db.set_quota("user", "openai", "acme", "alice", requests_per_day=1)
        assert (await final(service, ask("q", png()))).kind == "answer"
        quota = await final(service, ask("q2"))
        midnight = (NOW + timedelta(days=1)).replace(hour=0)
        assert quota.meta == {"reason": "quota", "retry_after_s": (midnight - NOW).total_seconds()}
        await db.add_rule("deny", "user", "openai", "alice")
        service._access.invalidate()  # the rules are cached for a few seconds
        assert (await final(service, ask("q3"))).meta == {"reason": "access_denied"}
        long_id = await final(service, ask("q", thread="x" * 200))
        assert long_id.meta == {"reason": "unsupported"}
        assert (await final(service, ask("help"))).meta == {"reason": "access_denied"}

    run(main)


def test_history_seeds_a_new_conversation_and_archives_the_old(run: Any) -> None:
    async def main(service: BotService, db: Database, backend: ScriptedBackend) -> None:
        key = ThreadRef("openai", "acme", "key-1", "t")
        await final(service, ask("first question", png()))
        old = await db.live_conversation(key)
        red, blue = png(), png((0, 0, 250))
        history = (
            HistoryTurn("user", "recipe", (ImageAttachment(red), ImageAttachment(blue))),
            HistoryTurn("assistant", "An edited answer."),
        )
        answer = await final(service, ask("and now?", history=history))
        assert answer.kind == "answer"
        new = await db.live_conversation(key)
        assert new.id != old.id and (await db.get_conversation(old.id)).archived_at is not None
        stored = [(t.role, t.text, t.image_id is not None, t.status) for t in await db.turns(new.id)]
        recipe = service.presets()[[p.name for p in service.presets()].index("recipe")].prompt
        assert stored == [
            ("user", "", True, "done"), ("user", recipe, True, "done"),
            ("assistant", "An edited answer.", False, "done"),
            ("user", "and now?", False, "done"), ("assistant", "A red square.", False, "done"),
        ]  # fmt: skip
        call = backend.calls[-1]
        assert [t["role"] for t in call["turns"]] == ["user", "user", "assistant", "user"]
        assert call["images"] == [red, blue] and call["conversation_id"] == str(new.id)
        usage = await db.usage_since("openai", "acme", "alice", NOW - timedelta(days=1))
        assert usage.images == 3 and usage.requests == 2  # the history's pictures count as pictures sent

        view = await service.thread(ThreadRef("openai", "acme", "key-1", "t"), turns=True)
        digests = [t.image_sha256 for t in view.turns]
        assert digests[:2] == [hashlib.sha256(red).hexdigest(), hashlib.sha256(blue).hexdigest()]
        assert digests[2:] == ["", "", ""]

        # An empty history starts over with nothing but the message (which then needs a picture).
        refused = await final(service, ask("no picture", history=()))
        assert refused.meta == {"reason": "bad_input"} and (await db.live_conversation(key)).id == new.id
        bad = await final(service, ask("q", history=(HistoryTurn("user", "x", (ImageAttachment(b"<html>"),)),)))
        assert bad.meta == {"reason": "bad_input"} and "message 1" in bad.text

    run(main)


def test_api_keys_through_the_core(run: Any) -> None:
    async def main(service: BotService, db: Database, _backend: ScriptedBackend) -> None:
        row, key = await db.create_api_key("openai", "acme", "alice")
        owner = await service.verify_api_key("openai", key)
        assert owner is not None and (owner.key_id, owner.user, owner.workspace) == (row.key_id, "alice", "acme")
        assert await service.verify_api_key("slack", key) is None
        assert await service.verify_api_key("openai", key + "x") is None
        assert service.generation_defaults.max_new_tokens == 300 and service.generation_defaults.max_length == 2000

    run(main)
