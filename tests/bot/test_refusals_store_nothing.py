"""A request refused before its answer (a quota, an access rule, no picture) stores no
conversation row (issue 26, item 19), on SQLite and PostgreSQL."""

from __future__ import annotations

from tests.bot import test_service
from tests.bot.test_service import Harness, png, req

run = test_service.run  # the core on SQLite and on PostgreSQL, with a scripted backend


async def _rows(h: Harness) -> int:
    return len(await h.db.list_conversations(limit=1000))


def test_quota_refusals_create_no_conversation_rows(run):
    async def fn(h: Harness):
        assert (await h.ask(req("What is this?", png(), thread="first")))[-1].kind == "answer"
        assert await _rows(h) == 1
        for i in range(5):
            (refused,) = await h.ask(req("And this?", png(), thread=f"new-{i}"))
            assert "limit of 1 request" in refused.text
        assert await _rows(h) == 1 and len(h.backend.calls) == 1

    run(fn, {"quotas": {"user": {"requests_per_day": 1, "images_per_day": 0}}})


def test_access_and_input_refusals_create_no_conversation_rows(run):
    async def fn(h: Harness):
        await h.db.add_rule("deny", "user", "slack", "mallory")
        (denied,) = await h.ask(req("What is this?", png(), user="mallory", thread="m"))
        assert denied.kind in ("notice", "error")
        (no_picture,) = await h.ask(req("What is this?", thread="none"))
        assert no_picture.kind == "notice"
        assert await _rows(h) == 0 and h.backend.calls == []

    run(fn)
