"""Fault injection, database: a real PostgreSQL stopped and started under a running core and web front end.

* readiness (``/readyz`` and the ``minigpt4_ready`` / ``minigpt4_check_ok`` gauges) turns 503 within a few
  seconds of the server stopping and 200 again once it is back, while ``/healthz`` stays 200;
* a request during the outage gets a clear error within a second, the next one after it succeeds;
* an answer whose final write hits a restart is stored by the retry (once: one usage entry);
* an answer the database never takes is still shown, and the give-up is logged with the turn id;
* a restart between two messages of a thread loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from PIL import Image

from adapters.web import WebFrontEnd, WebSettings
from bot.core.config import Settings
from bot.core.requests import Delta, Final, ImageAttachment, Request, ThreadRef
from bot.core.service import BotService
from storage import Database
from tests.scripted_backend import ScriptedBackend

SETTINGS = Settings.model_validate({})


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (20, 160, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def question(text: str, *, thread: str = "t1", picture: bool = False) -> Request:
    images = (ImageAttachment(png(), filename="p.png"),) if picture else ()
    return Request("web", "local", "chat", thread, "alice", text, images)


async def ask(service: BotService, request: Request) -> list[Any]:
    return [event async for event in service.handle(request)]


async def turns(db: Database, thread: str = "t1") -> list[Any]:
    conversation = await db.live_conversation(ThreadRef("web", "local", "chat", thread))
    return await db.turns(conversation.id) if conversation is not None else []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def web_front_end(service: BotService) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """The web front end started and watched for readiness as ``serve`` does it; an HTTP client and its base URL."""
    port = _free_port()
    front_end = WebFrontEnd(service, WebSettings(enabled=True, host="127.0.0.1", port=port))
    await front_end.start()
    service.watch_front_end(front_end.name, front_end.problem)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            yield http, f"http://127.0.0.1:{port}"
    finally:
        await front_end.stop()


async def until_status(http: aiohttp.ClientSession, url: str, status: int, within: float) -> tuple[float, Any]:
    """Poll ``url`` until it answers ``status``: (seconds it took, JSON body)."""
    started = time.monotonic()
    while True:
        async with http.get(url) as response:
            if response.status == status:
                return time.monotonic() - started, await response.json()
        assert time.monotonic() - started < within, f"{url} did not answer {status} within {within} s"
        await asyncio.sleep(0.1)


async def metrics(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(base + "/metrics") as response:
        assert response.status == 200
        return await response.text()


def test_fault_readiness_follows_postgres_down_and_up(faulty_pg, caplog) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        db = Database(faulty_pg.url)
        service = BotService(SETTINGS, db, ScriptedBackend())
        try:
            async with web_front_end(service) as (http, base):
                _took, body = await until_status(http, base + "/readyz", 200, within=5)
                assert body == {"status": "ready", "checks": {"database": "ok", "engine": "ok", "web": "ok"}}
                assert "minigpt4_ready 1.0" in await metrics(http, base)
                first = await ask(service, question("What is this?", picture=True))
                assert first[-1].kind == "answer"

                await faulty_pg.down()
                took, body = await until_status(http, base + "/readyz", 503, within=5)
                assert took < 3
                assert body["status"] == "unavailable" and body["checks"]["database"].startswith("unreachable")
                assert body["checks"]["engine"] == "ok" and body["checks"]["web"] == "ok"
                assert body["error"].startswith("database: unreachable")
                async with http.get(base + "/healthz") as live:  # liveness does not ask the database
                    assert live.status == 200 and (await live.json())["status"] == "ok"
                text = await metrics(http, base)
                assert "minigpt4_ready 0.0" in text and 'minigpt4_check_ok{check="database"} 0.0' in text
                assert 'minigpt4_check_ok{check="web"} 1.0' in text
                assert 'minigpt4_check_ok{check="engine"} 1.0' in text

                started = time.monotonic()  # a message during the outage: a clear error, at once
                during = await ask(service, question("And now?"))
                assert time.monotonic() - started < 1.0
                assert [(type(e), e.kind) for e in during] == [(Final, "error")]
                assert "try again" in during[0].text

                await faulty_pg.up()
                took, body = await until_status(http, base + "/readyz", 200, within=5)
                assert body["checks"]["database"] == "ok"
                assert "minigpt4_ready 1.0" in await metrics(http, base)

                after = await ask(service, question("And now?"))  # the next message after the outage is answered
                assert after[-1].kind == "answer"
                assert [(t.role, t.status) for t in await turns(db)] == [("user", "done"), ("assistant", "done")] * 2
        finally:
            await db.dispose()

    asyncio.run(main())
    logged = [r.getMessage() for r in caplog.records if r.name == "bot.core.service"]
    assert any(m.startswith("readiness: database: unreachable") for m in logged)
    assert "readiness: database is ok again" in logged
    assert sum(m.startswith("readiness: database: unreachable") for m in logged) == 1  # changes only, not every probe


def test_fault_an_answer_whose_final_write_hits_a_restart_is_stored_after_the_retry(faulty_pg, caplog) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        db = Database(faulty_pg.url)
        backend = ScriptedBackend("A green square.")
        service = BotService(SETTINGS, db, backend)
        restarted: list[asyncio.Task[None]] = []

        async def restart_while_storing() -> None:
            """The model is done, the user has seen the answer: the database goes down for ~0.7 s now."""
            await faulty_pg.down()

            async def back_up() -> None:
                await asyncio.sleep(0.7)
                await faulty_pg.up()

            restarted.append(asyncio.create_task(back_up()))

        backend.before_final = restart_while_storing
        try:
            events = await ask(service, question("What is this?", picture=True))
            await asyncio.gather(*restarted)
            deltas = "".join(e.text for e in events if isinstance(e, Delta))
            final = events[-1]
            assert final.kind == "answer" and final.text == deltas == "A green square."
            stored = await turns(db)
            assert [(t.role, t.status) for t in stored] == [("user", "done"), ("assistant", "done")]
            assert stored[1].text == "A green square." and stored[1].id == final.meta["turn_id"]
            usage = await db.usage_since("web", "local", "alice", db.now().replace(hour=0, minute=0))
            assert usage.requests == 1 and usage.images == 1  # written once
            assert "minigpt4_answer_store_retries_total" in service.metrics_text().decode()
        finally:
            await db.dispose()

    asyncio.run(main())
    logged = [r.getMessage() for r in caplog.records if r.name == "bot.core.service"]
    assert any(m.startswith("turn 2: storing the answer failed") for m in logged), logged
    assert any(m.startswith("turn 2: answer stored on try ") for m in logged), logged


def test_fault_an_answer_the_database_never_takes_is_shown_and_its_turn_logged(faulty_pg, caplog, monkeypatch) -> None:
    monkeypatch.setattr(BotService, "STORE_RETRY_DELAYS_S", (0.05, 0.1))

    async def main() -> None:
        db = Database(faulty_pg.url)
        backend = ScriptedBackend("A blue dot.")
        service = BotService(SETTINGS, db, backend)
        backend.before_final = faulty_pg.down
        try:
            events = await ask(service, question("What is this?", picture=True))
            assert events[-1].kind == "answer" and events[-1].text == "A blue dot."  # the user still gets it
            assert "minigpt4_answers_unsaved_total 1.0" in service.metrics_text().decode()
            await faulty_pg.up()
            restarted = BotService(SETTINGS, db, backend)  # the next start of this process (same host and pid)
            assert await restarted.recover() == 1  # the unfinished answer is marked, not lost
            assert [t.status for t in await turns(db)] == ["done", "interrupted"]
        finally:
            await db.dispose()

    asyncio.run(main())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(m.startswith("turn 2: giving up storing the answer after 3 tries") for m in errors), errors


def test_fault_a_restart_between_two_messages_of_a_thread_loses_nothing(faulty_pg) -> None:
    async def main() -> None:
        db = Database(faulty_pg.url)
        backend = ScriptedBackend()
        backend.script = ["A red circle.", "It is red."]
        service = BotService(SETTINGS, db, backend)
        try:
            first = await ask(service, question("What is this?", picture=True))
            assert first[-1].kind == "answer"
            await faulty_pg.restart()  # the pool's connections are dead now
            second = await ask(service, question("What colour?"))
            assert second[-1].kind == "answer" and second[-1].text == "It is red."
            stored = await turns(db)
            assert [(t.role, t.status, t.text) for t in stored] == [
                ("user", "done", "What is this?"), ("assistant", "done", "A red circle."),
                ("user", "done", "What colour?"), ("assistant", "done", "It is red."),
            ]  # fmt: skip
            history = backend.calls[-1]["turns"]  # the model saw the whole thread, picture included
            assert [t["text"] for t in history] == ["What is this?", "A red circle.", "What colour?"]
            assert len(backend.calls[-1]["images"]) == 1
        finally:
            await db.dispose()

    asyncio.run(main())


def test_fault_unavailable_is_told_apart_from_a_wrong_statement() -> None:
    """What the final write retries (and the log shortens): connection trouble, also wrapped by SQLAlchemy —
    never a statement the database rejects, which no retry can fix."""
    import asyncpg
    from sqlalchemy.exc import DBAPIError, IntegrityError

    from storage import is_unavailable

    starting = DBAPIError("UPDATE turns …", {}, asyncpg.exceptions.CannotConnectNowError("starting up"))
    assert is_unavailable(starting) and is_unavailable(ConnectionRefusedError(111, "refused"))
    assert is_unavailable(asyncpg.exceptions.AdminShutdownError("terminating connection"))
    assert is_unavailable(asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"))
    assert not is_unavailable(DBAPIError("…", {}, asyncpg.exceptions.CharacterNotInRepertoireError("0x00")))
    assert not is_unavailable(IntegrityError("INSERT …", {}, asyncpg.exceptions.UniqueViolationError("dup")))
    assert not is_unavailable(ValueError("no"))
