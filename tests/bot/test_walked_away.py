"""An answer the user walks away from keeps what was streamed (issue 26, item 2), on SQLite and PostgreSQL.

Stop, a reload, a closed tab or Ctrl-C close the reply iterator; kill -9 ends the process.  Either way the
stored answer is ``interrupted`` with the text streamed so far (kept periodically while streaming, so a kill
-9 keeps most of it), and a retry of the same event id whose answer failed or was interrupted is answered
again — a redelivery of an answered or still-streaming event stays a duplicate.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from bot.core.config import Settings
from bot.core.requests import Delta, Final, ThreadRef
from bot.core.service import BotService
from model.engine.contract import Busy
from storage import Database
from tests.bot import test_service
from tests.bot.test_service import Harness, png, req
from tests.scripted_backend import ScriptedBackend

run = test_service.run  # the core on SQLite and on PostgreSQL, with a scripted backend

ROOT = Path(__file__).resolve().parents[2]
LONG = " ".join(f"word{i}" for i in range(400))


async def _until(check: Any, timeout: float = 30.0) -> Any:
    """Poll ``check()`` (async) until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := await check():
            return value
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


def test_an_answer_closed_mid_stream_keeps_the_streamed_text(run):
    async def fn(h: Harness):
        h.backend.answer, h.backend.delay = LONG, 0.01
        h.service.PARTIAL_SAVE_S = 0.0  # every token (production: about once a second)
        stream = h.service.handle(req("What is this?", png(), event_id="e1"))
        seen = ""
        while len(seen.split()) < 20:
            event = await anext(stream)
            assert isinstance(event, Delta)
            seen += event.text

        async def saved() -> str:
            answer = (await h.turns())[-1]
            return answer.text if answer.status == "streaming" and len(answer.text.split()) >= 10 else ""

        assert (await _until(saved)) in seen  # stored while streaming, before anything ended
        await stream.aclose()  # Stop / reload / closed tab / Ctrl-C
        answer = (await h.turns())[-1]
        assert answer.status == "interrupted" and answer.text == seen.strip()
        assert (await h.ask(req("And now?")))[-1].kind == "answer"
        sent = h.backend.calls[-1]["turns"]
        assert all(t["role"] == "user" for t in sent)  # an interrupted answer is kept, not sent to the model

    run(fn)


def test_partial_text_is_written_periodically_not_per_token(run):
    """The default cadence: one small UPDATE about a second apart, not one per token."""

    async def fn(h: Harness):
        h.backend.answer, h.backend.delay = LONG, 0.005
        writes: list[str] = []
        save = h.db.save_partial

        async def counted(turn_id: int, text: str) -> bool:
            writes.append(text)
            return await save(turn_id, text)

        h.db.save_partial = counted  # type: ignore[method-assign]
        events = await h.ask(req("What is this?", png()))
        tokens = sum(isinstance(e, Delta) for e in events)
        assert events[-1].kind == "answer" and tokens == 400
        assert len(writes) < tokens / 10  # ~2 s of streaming: a couple of writes
        assert all(LONG.startswith(w) for w in writes)
        assert (await h.turns())[-1].text == LONG  # the final write wins

    run(fn)


def test_a_late_partial_write_never_overwrites_the_final_answer(run):
    async def fn(h: Harness):
        await h.ask(req("What is this?", png()))
        answer = (await h.turns())[-1]
        assert not await h.db.save_partial(answer.id, "A re")
        assert (await h.turns())[-1].text == "A red circle."

    run(fn)


def test_a_retried_event_whose_answer_failed_or_was_interrupted_is_answered(run):
    async def fn(h: Harness):
        h.backend.fail = Busy("queue full", 3.0)
        (busy,) = await h.ask(req("What is this?", png(), event_id="e1"))
        assert busy.kind == "error"
        h.backend.fail = None
        retried = await h.ask(req("What is this?", png(), event_id="e1"))  # the page's Retry button
        assert retried[-1].kind == "answer"
        assert await h.ask(req("What is this?", png(), event_id="e1")) == []  # answered now: a duplicate

        h.backend.delay = 0.05
        stream = h.service.handle(req("Go on", event_id="e2"))
        assert isinstance(await anext(stream), Delta)
        assert await h.ask(req("Go on", event_id="e2")) == []  # still streaming: a duplicate
        await stream.aclose()
        h.backend.delay = 0.0
        assert (await h.ask(req("Go on", event_id="e2")))[-1].kind == "answer"  # interrupted: answered again
        statuses = [t.status for t in await h.turns() if t.role == "assistant"]
        assert statuses == ["failed", "done", "interrupted", "done"]

    run(fn)


def test_simultaneous_retries_of_a_failed_event_are_answered_once(run):
    async def fn(h: Harness):
        h.backend.fail = Busy("queue full", 3.0)
        await h.ask(req("What is this?", png(), event_id="e1"))
        h.backend.fail = None
        replies = await asyncio.gather(*(h.ask(req("What is this?", png(), event_id="e1")) for _ in range(4)))
        assert sorted(len(r) for r in replies)[:3] == [0, 0, 0]
        assert sum(1 for r in replies if r and r[-1].kind == "answer") == 1

    run(fn)


def test_an_event_refused_before_its_answer_stays_a_duplicate(run):
    """Only an answer that failed or was interrupted is retried: a refusal (here: a quota) is not repeated."""

    async def fn(h: Harness):
        assert (await h.ask(req("What is this?", png(), event_id="e0")))[-1].kind == "answer"
        (refused,) = await h.ask(req("And this?", png(), event_id="e1"))
        assert "limit of 1 request" in refused.text
        assert await h.ask(req("And this?", png(), event_id="e1")) == []

    run(fn, {"quotas": {"user": {"requests_per_day": 1, "images_per_day": 0}}})


def test_a_refused_event_that_asks_for_it_gets_its_id_back_and_its_retry_is_answered(run):
    """``retry_refused`` (an API's Idempotency-Key): a request refused before anything was stored frees its id —
    once the quota allows, the same id is answered, then it is a duplicate like any answered event."""

    async def fn(h: Harness):
        assert (await h.ask(req("What is this?", png(), event_id="e0", retry_refused=True)))[-1].kind == "answer"
        (refused,) = await h.ask(req("And this?", png(), event_id="e1", retry_refused=True))
        assert "limit of 1 request" in refused.text
        assert not await h.db.event_seen("slack", "e1")
        await h.db.set_quota("user", "slack", "T1", "alice", requests_per_day=2)
        assert (await h.ask(req("And this?", png(), event_id="e1", retry_refused=True)))[-1].kind == "answer"
        assert await h.ask(req("And this?", png(), event_id="e1", retry_refused=True)) == []
        assert not await h.db.forget_event("slack", "e1")  # answered: its id is never given back
        assert [t.text for t in await h.turns() if t.role == "user"].count("And this?") == 1

    run(fn, {"quotas": {"user": {"requests_per_day": 1, "images_per_day": 0}}})


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from bot.core.config import Settings
    from bot.core.requests import Delta, ImageAttachment, Request
    from bot.core.service import BotService
    from storage import Database
    from tests.scripted_backend import ScriptedBackend

    async def main():
        url, picture, answer = sys.argv[1], open(sys.argv[2], "rb").read(), sys.argv[3]
        db = Database(url)
        service = BotService(Settings(), db, ScriptedBackend(answer, delay=0.02))
        service.PARTIAL_SAVE_S = 0.2
        await service.recover()
        request = Request("web", "W", "C", "t", "alice", "What is this?", (ImageAttachment(picture),),
                          event_id="ev1")
        async for event in service.handle(request):
            if isinstance(event, Delta):
                print(event.text, end="", flush=True)

    asyncio.run(main())
    """
)


def test_kill_9_mid_answer_keeps_most_of_the_text_and_the_retry_is_answered(db_url: str, tmp_path: Path) -> None:
    picture = tmp_path / "p.png"
    picture.write_bytes(png())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, db_url, str(picture), LONG],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    key = ThreadRef("web", "W", "C", "t")

    async def main() -> None:
        db = Database(db_url)
        try:

            async def stored() -> Any:
                conv = await db.live_conversation(key)
                turns = await db.turns(conv.id) if conv else []
                answer = turns[-1] if len(turns) == 2 else None
                return answer if answer is not None and len(answer.text.split()) >= 40 else None

            assert child.poll() is None
            await _until(stored, timeout=60)
            os.kill(child.pid, signal.SIGKILL)
            await asyncio.to_thread(child.wait)
            answer = await stored()
            assert answer.status == "streaming"

            backend = ScriptedBackend()
            service = BotService(Settings(), db, backend)
            assert await service.recover() == 1  # the restart's sweep: the dead process's answer
            (kept,) = [t for t in await db.turns(answer.conversation_id) if t.role == "assistant"]
            assert kept.status == "interrupted" and kept.text == answer.text and LONG.startswith(kept.text)

            retry = _retry(picture.read_bytes())
            events = [e async for e in service.handle(retry)]
            assert events[-1].kind == "answer" and isinstance(events[-1], Final)
            assert [e async for e in service.handle(retry)] == []
            await service.close()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            await db.dispose()

    asyncio.run(main())
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:] if child.stderr else ""


def _retry(picture: bytes) -> Any:
    """The same event as the killed process's, as the page's Retry button resends it."""
    from bot.core.requests import ImageAttachment, Request

    return Request("web", "W", "C", "t", "alice", "What is this?", (ImageAttachment(picture),), event_id="ev1")


def test_event_seen_agrees_with_the_retry_rule(run):
    """The read a front end may make before fetching files: a failed answer's event is not seen."""

    async def fn(h: Harness):
        assert not await h.db.event_seen("slack", "e1")
        h.backend.fail = Busy("queue full", 3.0)
        await h.ask(req("What is this?", png(), event_id="e1"))
        assert not await h.db.event_seen("slack", "e1")
        h.backend.fail = None
        await h.ask(req("What is this?", png(), event_id="e1"))
        assert await h.db.event_seen("slack", "e1")

    run(fn)


def test_a_retry_is_not_sent_to_the_model_twice(run):
    """The retried message is the same message: the model sees its question and picture once, not the failed
    attempt's copy too (both stay stored: nothing is deleted)."""

    async def fn(h: Harness):
        await h.ask(req("First?", png((1, 2, 3)), event_id="e0"))
        h.backend.fail = Busy("queue full", 3.0)
        await h.ask(req("What is this?", png(), event_id="e1"))
        h.backend.fail = None
        assert (await h.ask(req("What is this?", png(), event_id="e1")))[-1].kind == "answer"
        sent = h.backend.calls[-1]
        assert [(t["role"], t.get("text")) for t in sent["turns"]] == [
            ("user", "First?"), ("assistant", "A red circle."), ("user", "What is this?")
        ]  # fmt: skip
        assert len(sent["images"]) == 2
        assert [t.role for t in await h.turns()] == ["user", "assistant", "user", "assistant", "user", "assistant"]
        await h.ask(req("And now?"))  # a new message later: the failed attempt's copy stays out too
        assert [t.get("text") for t in h.backend.calls[-1]["turns"] if t["role"] == "user"] == [
            "First?", "What is this?", "And now?"
        ]  # fmt: skip

    run(fn)
