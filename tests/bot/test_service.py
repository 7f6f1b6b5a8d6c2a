"""The bot core on SQLite and a real PostgreSQL, with a scripted model backend (no torch work).

Covers dedup, access rules, commands, presets, quotas, pictures, multi-image threads, failures,
backpressure, sanitising and metrics; the real engine is exercised in tests/web, tests/system.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from PIL import Image

from bot.core.config import Settings
from bot.core.requests import Delta, Final, ImageAttachment, Request, ThreadRef
from bot.core.service import BotService
from model.engine.contract import Busy, RequestFailed, RequestRejected
from storage import Database, UsageTotals
from tests.scripted_backend import ScriptedBackend


@dataclass
class MovableClock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


def png(color=(200, 10, 10), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def req(text: str = "", *images: bytes, thread: str = "t1", user: str = "alice", **kw: Any) -> Request:
    return Request("slack", "T1", "C1", thread, user, text, tuple(ImageAttachment(i) for i in images), **kw)


START = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


class Harness:
    """The core on a database whose one clock the test moves (``h.clock.now``): stored stamps and quota windows
    agree."""

    def __init__(self, db: Database, settings: Settings, backend: ScriptedBackend, clock: MovableClock) -> None:
        self.db, self.backend, self.clock = db, backend, clock
        self.service = BotService(settings, db, backend)

    async def ask(self, request: Request) -> list[Any]:
        return [event async for event in self.service.handle(request)]

    async def turns(self, thread: str = "t1") -> list[Any]:

        conv = await self.db.live_conversation(ThreadRef("slack", "T1", "C1", thread))
        return await self.db.turns(conv.id) if conv else []


@pytest.fixture
def run(db_url):
    """``run(async_fn, settings=None)`` with a fresh harness on SQLite and on PostgreSQL."""

    def go(fn, settings: dict | None = None):
        async def main():
            clock = MovableClock(START)
            db = Database(db_url, clock=clock)
            try:
                harness = Harness(db, Settings.model_validate(settings or {}), ScriptedBackend(), clock)
                return await fn(harness)
            finally:
                await db.dispose()

        return asyncio.run(main())

    return go


def test_answer_is_streamed_stored_and_counted(run):
    async def fn(h: Harness):
        events = await h.ask(req("What is this?", png(), event_id="e1"))
        assert [type(e) for e in events] == [Delta, Delta, Delta, Final]
        assert events[-1].text == "A red circle." and events[-1].kind == "answer"
        turns = await h.turns()
        assert [(t.role, t.status) for t in turns] == [("user", "done"), ("assistant", "done")]
        assert turns[1].text == "A red circle." and turns[1].completion_tokens == 3 and turns[1].ttft_ms == 10
        usage = await h.db.usage_since("slack", "T1", "alice", h.clock.now.replace(hour=0))
        assert (usage.requests, usage.tokens, usage.images) == (1, 3, 1)
        call = h.backend.calls[0]
        assert call["turns"] == [{"role": "user", "text": "What is this?", "image": True}]
        assert len(call["images"]) == 1 and call["user"] == "alice"

    run(fn)


def test_redelivered_event_is_ignored(run):
    async def fn(h: Harness):
        assert await h.ask(req("What is this?", png(), event_id="e1"))
        assert await h.ask(req("What is this?", png(), event_id="e1")) == []
        assert len(await h.turns()) == 2 and len(h.backend.calls) == 1

    run(fn)


def test_follow_ups_and_new_pictures_join_the_thread(run):
    async def fn(h: Harness):
        await h.ask(req("Describe this.", png((1, 2, 3))))
        await h.ask(req("And the colour?"))
        await h.ask(req("Compare them.", png((9, 9, 9)), png((8, 8, 8))))
        call = h.backend.calls[-1]
        roles = [(t["role"], t.get("image", False)) for t in call["turns"]]
        assert roles == [("user", True), ("assistant", False), ("user", False), ("assistant", False),
                         ("user", True), ("user", True)]  # fmt: skip
        assert call["turns"][-1]["text"] == "Compare them." and len(call["images"]) == 3
        assert len(await h.turns()) == 7

    run(fn)


def test_no_picture_in_thread_gets_help_and_stores_nothing(run):
    async def fn(h: Harness):
        (event,) = await h.ask(req("hello"))
        assert event.kind == "notice" and "attach an image" in event.text
        assert await h.turns() == [] and h.backend.calls == []

    run(fn)


def test_commands(run):
    async def fn(h: Harness):
        (helped,) = await h.ask(req("help"))
        assert helped.kind == "help" and helped.ephemeral and "recipe" in helped.text and "`" not in helped.text
        await h.ask(req("hi", png()))
        (settings,) = await h.ask(req("settings"))
        assert "vicuna0" in settings.text and "requests per day 200 (1 used)" in settings.text
        (reset,) = await h.ask(req("reset"))
        assert "Starting over" in reset.text
        assert await h.turns() == []  # the old conversation is archived, not deleted
        (notice,) = await h.ask(req("and now?"))
        assert notice.kind == "notice"

    run(fn)


def test_presets_by_name_default_and_override(run):
    settings = {"presets": {"overrides": [{"name": "recipe", "prompt": "Vegetarian please.", "channel": "C1"}]}}

    async def fn(h: Harness):
        await h.ask(req("", png()))  # a bare picture uses the default preset
        assert h.backend.calls[-1]["turns"][-1]["text"] == "Describe this image in detail."
        await h.ask(req("poem: about cats", thread="t2"))  # no picture yet in t2 → help
        await h.ask(req("/poem about cats", png(), thread="t3"))
        assert h.backend.calls[-1]["turns"][-1]["text"] == "Write a poem inspired by this image. about cats"
        await h.ask(req("/recipe", png(), thread="t4"))
        assert h.backend.calls[-1]["turns"][-1]["text"] == "Vegetarian please."
        await h.ask(req("something", png(), thread="t5", preset="story"))
        assert h.backend.calls[-1]["turns"][-1]["text"].startswith("Write a short story")
        (bad,) = await h.ask(req("x", png(), thread="t6", preset="limerick"))
        assert bad.kind == "notice" and "limerick" in bad.text

    run(fn, settings)


def test_quota_names_the_limit_and_reset_time(run):
    settings = {"quotas": {"user": {"requests_per_day": 2, "images_per_day": 0}}}

    async def fn(h: Harness):
        await h.ask(req("one", png()))
        await h.ask(req("two"))
        (refused,) = await h.ask(req("three"))
        assert refused.kind == "error" and refused.ephemeral
        assert "limit of 2 requests per day" in refused.text and "2026-11-26 00:00 UTC" in refused.text
        (mine,) = await h.ask(req("settings"))
        assert "Your limits: requests per day 2 (2 used)" in mine.text and "workspace" not in mine.text
        assert len(await h.turns()) == 4  # the refused question was not stored or sent
        await h.db.set_quota("user", "slack", "T1", "alice", requests_per_day=3)  # admin override
        assert (await h.ask(req("three")))[-1].kind == "answer"
        h.clock.now = h.clock.now.replace(day=26)  # a new day
        assert (await h.ask(req("four")))[-1].kind == "answer"
        metrics = h.service.metrics.render().decode()
        assert 'minigpt4_quota_rejections_total{limit="requests_per_day",scope="user"} 1.0' in metrics

    run(fn, settings)


def test_workspace_token_and_image_quotas(run):
    settings = {"quotas": {"user": {"requests_per_day": 0, "images_per_day": 2},
                           "workspace": {"tokens_per_month": 5}}}  # fmt: skip

    async def fn(h: Harness):
        (over,) = await h.ask(req("many", png((1, 1, 1)), png((2, 2, 2)), png((3, 3, 3))))
        assert "3 images per day" not in over.text and "limit of 2 images per day" in over.text
        await h.ask(req("two", png((1, 1, 1)), png((2, 2, 2)), user="bob"))
        await h.ask(req("more", user="bob"))  # 3 + 3 = 6 tokens used this month
        (refused,) = await h.ask(req("again", png(), user="carol", thread="t9"))
        assert "This workspace has reached the limit of 5 tokens per month" in refused.text
        (carol,) = await h.ask(req("settings", user="carol", thread="t9"))
        assert "Your limits: images per day 2 (0 used)" in carol.text
        assert "This workspace's limits (everyone together): tokens per month 5 (6 used)" in carol.text

    run(fn, settings)


def test_simultaneous_requests_are_counted_exactly(run):
    """A limit holds for requests sent at once (several threads, one user), not only for requests in turn."""
    settings = {"quotas": {"user": {"requests_per_day": 3, "images_per_day": 0},
                           "workspace": {"requests_per_day": 5}}}  # fmt: skip

    async def fn(h: Harness):
        h.backend.delay = 0.01  # answers overlap: none is stored before the others are admitted

        async def burst(user: str, n: int) -> list[Any]:
            replies = await asyncio.gather(
                *(h.ask(req("What?", png(), thread=f"{user}{i}", user=user)) for i in range(n))
            )
            return [events[-1] for events in replies]

        alice = await burst("alice", 6)
        assert sorted(e.kind for e in alice) == ["answer"] * 3 + ["error"] * 3
        assert all("limit of 3 requests per day" in e.text for e in alice if e.kind == "error")
        bob = await burst("bob", 4)  # the workspace has 2 of its 5 left
        assert sorted(e.kind for e in bob) == ["answer"] * 2 + ["error"] * 2
        assert all("This workspace has reached the limit of 5" in e.text for e in bob if e.kind == "error")
        since = h.clock.now.replace(hour=0)
        assert (await h.db.usage_since("slack", "T1", "alice", since)).requests == 3
        assert (await h.db.usage_since("slack", "T1", None, since)) == UsageTotals(5, 5 * 3, 5)
        assert len(h.backend.calls) == 5

    run(fn, settings)


def test_simultaneous_pictures_are_counted_exactly(run):
    settings = {"quotas": {"user": {"requests_per_day": 0, "images_per_day": 3}}}

    async def fn(h: Harness):
        two = png((1, 1, 1)), png((2, 2, 2))
        replies = await asyncio.gather(*(h.ask(req("What?", *two, thread=f"t{i}")) for i in range(4)))
        assert sorted(events[-1].kind for events in replies) == ["answer", "error", "error", "error"]
        assert (await h.db.usage_since("slack", "T1", "alice", h.clock.now.replace(hour=0))).images == 2

    run(fn, settings)


def test_a_failed_answer_is_not_charged_and_an_interrupted_one_is(run):
    """The request is reserved when admitted; the bot's own failure gives it back, a user leaving does not."""
    settings = {"quotas": {"user": {"requests_per_day": 2, "images_per_day": 0}}}

    async def fn(h: Harness):
        since = h.clock.now.replace(hour=0)
        h.backend.fail = RequestFailed("engine step failed")
        (failed,) = await h.ask(req("What?", png()))
        assert failed.kind == "error"
        assert await h.db.usage_since("slack", "T1", "alice", since) == UsageTotals()
        h.backend.fail, h.backend.delay = None, 0.05
        stream = h.service.handle(req("And now?"))
        assert isinstance(await anext(stream), Delta)
        await stream.aclose()  # the user went away mid-answer: the work was done
        assert (await h.turns())[-1].status == "interrupted"
        left = await h.db.usage_since("slack", "T1", "alice", since)
        assert left.requests == 1 and 1 <= left.tokens < 3  # charged the tokens made before the user left
        assert (await h.ask(req("Once more?")))[-1].kind == "answer"
        (refused,) = await h.ask(req("And again?"))
        assert "limit of 2 requests per day" in refused.text

    run(fn, settings)


def test_ids_longer_than_storage_keeps_get_the_same_clear_refusal_on_both_databases(run, caplog):
    """PostgreSQL enforces the id columns' lengths and SQLite does not: the core checks them for both."""

    async def fn(h: Harness):
        cases = {
            "thread": req("What?", png(), thread="t" * 129),
            "user": req("What?", png(), user="u" * 129),
            "platform": dataclasses.replace(req("What?", png()), platform="p" * 33),
            "event_id": req("What?", png(), event_id="e" * 256),
        }
        for name, request in cases.items():
            (refused,) = await h.ask(request)
            assert refused.kind == "error" and "identifier I can't store" in refused.text, name
            assert f"sent a {name} of" in caplog.text
        assert await h.turns() == [] and h.backend.calls == []  # nothing stored, nothing sent
        (fine,) = [
            e for e in await h.ask(req("What?", png(), thread="t" * 128, user="u" * 128)) if isinstance(e, Final)
        ]
        assert fine.kind == "answer"  # the longest ids stored are fine on both

    with caplog.at_level("WARNING", logger="bot.core.service"):
        run(fn)


def test_access_rules(run):
    async def fn(h: Harness):
        await h.db.add_rule("deny", "user", "slack", "mallory")
        (denied,) = await h.ask(req("hi", png(), user="mallory"))
        assert denied.kind == "error" and "not enabled" in denied.text
        await h.db.add_rule("allow", "channel", "slack", "C9")
        h.service._access.invalidate()  # the admin CLI edits rules in another process; the cache expires
        (blocked,) = await h.ask(req("hi", png()))  # C1 is not on the channel allow-list
        assert "not enabled" in blocked.text
        await h.db.add_rule("allow", "channel", "slack", "C1")
        h.service._access.invalidate()  # the admin CLI edits rules in another process; the cache expires
        assert (await h.ask(req("hi", png())))[-1].kind == "answer"

    run(fn)


def test_bad_pictures_get_clear_replies(run):
    settings = {"images": {"max_bytes": 200_000, "max_pixels": 1_000_000}}
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (5, 5, 5)).save(jpeg, format="JPEG")
    cases = {
        b"<!DOCTYPE html><html>Sign in</html>": "web page",
        jpeg.getvalue()[:200]: "truncated or corrupt",
        png(size=(1200, 1000)): "1200×1000 pixels",
        b"GIF89a not really": "not an image I can read",
        b"\x00" * 300_000: "293 KiB; the limit is 195 KiB",
        b"": "empty",
    }

    async def fn(h: Harness):
        for i, (data, expected) in enumerate(cases.items()):
            (event,) = await h.ask(req("what?", data, thread=f"bad{i}"))
            assert event.kind == "notice" and expected in event.text, (expected, event.text)
        tiff = io.BytesIO()
        Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
        (event,) = await h.ask(req("what?", tiff.getvalue(), thread="tiff"))
        assert "TIFF file" in event.text
        assert h.backend.calls == []

    run(fn, settings)


def test_backend_failures_keep_history(run):
    async def fn(h: Harness):
        await h.ask(req("first", png()))
        h.backend.fail = Busy("queue full", 12.0)
        (busy,) = await h.ask(req("second"))
        assert busy.kind == "error" and "about 12 seconds" in busy.text
        h.backend.fail = RuntimeError("CUDA out of memory")
        (broken,) = await h.ask(req("third"))
        assert broken.kind == "error" and "CUDA" not in broken.text and "went wrong" in broken.text
        h.backend.fail = None
        await h.ask(req("fourth"))
        turns = await h.turns()
        assert [t.status for t in turns] == ["done", "done", "done", "failed", "done", "failed", "done", "done"]
        # failed answers are left out of what the model sees next
        sent = h.backend.calls[-1]["turns"]
        assert [t["role"] for t in sent] == ["user", "assistant", "user", "user", "user"]

    run(fn)


def test_mass_mentions_are_neutralised(run):
    async def fn(h: Harness):
        h.backend.answer = "Hey @everyone and <!here> look"
        events = await h.ask(req("hi", png()))
        final = events[-1].text
        assert "@everyone" not in final and "<!here>" not in final and "look" in final
        assert all("@everyone" not in e.text for e in events)
        assert "@everyone" not in (await h.turns())[1].text

    run(fn)


def test_heic_photos_are_accepted(run):
    import pillow_heif  # the maintained HEIF decoder bot/images.py registers

    pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(buf, format="HEIF")

    async def fn(h: Harness):
        events = await h.ask(req("What is this?", buf.getvalue()))
        assert events[-1].kind == "answer"
        turns = await h.turns()
        info = await h.db.image_data([turns[0].image_id])
        assert info[turns[0].image_id] == buf.getvalue()  # stored as received, decoded by Pillow + pillow-heif

    run(fn)


def test_backend_errors_are_told_by_type_not_by_text(run):
    """An engine crash is the bot's fault (error, public), a bad picture the input's (notice), never mixed up."""

    async def fn(h: Harness):
        await h.ask(req("first", png()))
        h.backend.fail = RequestFailed("engine step failed: CUDA error")
        (broken,) = await h.ask(req("second"))
        assert (broken.kind, broken.ephemeral) == ("error", False) and "went wrong" in broken.text
        assert "CUDA" not in broken.text
        h.backend.fail = RequestRejected("image", "cannot identify image file", image_index=0)
        (bad,) = await h.ask(req("third"))
        assert (bad.kind, bad.ephemeral) == ("notice", True) and "picture 1" in bad.text
        h.backend.fail = RequestRejected("too_large", "2100 tokens > 2000")
        (long,) = await h.ask(req("fourth"))
        assert long.kind == "notice" and "reset" in long.text
        h.backend.fail = ValueError("a bug in a backend")
        (odd,) = await h.ask(req("fifth"))
        assert odd.kind == "error" and "bug" not in odd.text
        metrics = h.service.metrics_text().decode()
        assert 'minigpt4_requests_total{outcome="ModelUnavailable",platform="slack"} 2.0' in metrics
        assert 'minigpt4_requests_total{outcome="ImageError",platform="slack"} 1.0' in metrics
        assert 'outcome="UserInputError"' in metrics

    run(fn)


def test_thread_view_tells_live_followed_and_history(run):
    async def fn(h: Harness):
        from bot.core.requests import ThreadRef

        ref = ThreadRef("slack", "T1", "C1", "t1")
        empty = await h.service.thread(ref)
        assert (empty.live, empty.followed, empty.has_image, empty.turns) == (False, False, False, ())
        (notice,) = await h.ask(req("what is this?", addressed=True))  # a mention without a picture
        assert notice.kind == "notice"
        followed = await h.service.thread(ref)
        assert (followed.live, followed.followed) == (False, True)  # no conversation yet, but followed
        await h.ask(req("now with a picture", png()))
        view = await h.service.thread(ref, turns=True)
        assert view.live and view.has_image
        assert [(t.role, t.text, t.has_image, t.status) for t in view.turns] == [
            ("user", "now with a picture", True, "done"),
            ("assistant", "A red circle.", False, "done"),
        ]
        assert (await h.service.thread(ref)).turns == ()  # history only when asked for
        await h.ask(req("reset"))
        after = await h.service.thread(ref)
        assert (after.live, after.followed) == (False, True)
        # Following lives in SQL: a second service on the same database (a restart) sees it.
        again = BotService(h.service.settings, h.db, ScriptedBackend())
        assert (await again.thread(ref)).followed
        assert not (await again.thread(ThreadRef("slack", "T1", "C1", "elsewhere"))).followed

    run(fn)


def test_a_picture_the_front_end_could_not_fetch_is_answered_once(run):
    async def fn(h: Harness):
        failed = ImageAttachment(b"", filename="cat.heic", error="cat.heic is larger than 20 MiB.")
        request = Request("slack", "T1", "C1", "t1", "alice", "look", (failed,), event_id="Ev9")
        (first,) = [e async for e in h.service.handle(request)]
        assert (first.kind, first.ephemeral, first.text) == ("notice", True, "cat.heic is larger than 20 MiB.")
        assert [e async for e in h.service.handle(request)] == []  # a redelivery of it: dropped by the core
        assert h.backend.calls == [] and await h.turns() == []

    run(fn)


def test_the_core_api_for_front_ends(run):
    settings = {
        "presets": {"overrides": [{"name": "recipe", "prompt": "Vegan recipes only.", "workspace": "T1"}]},
        "images": {"max_per_message": 2},
    }

    async def fn(h: Harness):
        from bot.core.frontend_api import Core

        assert isinstance(h.service, Core)
        here = {p.name: p.prompt for p in h.service.presets("T1", "C1")}
        assert here["recipe"] == "Vegan recipes only." and "recipe" in {p.name for p in h.service.presets()}
        assert h.service.presets()[0].name == "describe" and h.service.default_preset == "describe"
        assert h.service.image_limits.max_per_message == 2
        help_text = h.service.help_text()
        assert "recipe" in help_text and "*" not in help_text and "`" not in help_text  # plain text
        (settings_reply,) = await h.ask(req("settings"))
        assert "*" not in settings_reply.text and "Model: MiniGPT-4 vicuna0" in settings_reply.text
        health = await h.service.health()
        assert (
            health.ok and health.model["variant"] == "vicuna0" and health.engine == {"queue_depth": 0, "batch_size": 0}
        )
        assert b"minigpt4_engine_queue_depth" in h.service.metrics_text()

    run(fn, settings)
