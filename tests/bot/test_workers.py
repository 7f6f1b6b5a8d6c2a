"""Several bot processes on one database: a start (or a heartbeat) marks interrupted only the answers of
processes that are gone, never one another process is still streaming.  SQLite and PostgreSQL.

Each "process" is a :class:`BotService` with its own :class:`WorkerIdentity` (another host, so only the
heartbeat can tell whether it runs) on its own :class:`Database` engine.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import timedelta
from typing import Any

from bot.core.config import Settings
from bot.core.requests import Delta, Final, ThreadRef
from bot.core.service import BotService
from bot.core.workers import STALE_AFTER_S, WorkerIdentity
from storage import Database
from tests.bot.test_service import START, MovableClock, png, req
from tests.scripted_backend import ScriptedBackend

SETTINGS = Settings.model_validate({})


def _service(url: str, clock: MovableClock, host: str, pid: int = 4242, **backend: Any) -> BotService:
    worker = WorkerIdentity(f"{host}:{pid}:x", host, pid)
    return BotService(SETTINGS, Database(url, clock=clock), ScriptedBackend(**backend), worker=worker)


async def _statuses(service: BotService, thread: str = "t1") -> list[str]:
    db = service._db
    conversation = await db.live_conversation(ThreadRef("slack", "T1", "C1", thread))
    return [t.status for t in await db.turns(conversation.id) if t.role == "assistant"] if conversation else []


def _dead_pid() -> int:
    """The pid of a process that has exited (reaped): nothing runs under it right now."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_restart_spares_answers_another_process_is_streaming(db_url: str) -> None:
    async def main() -> tuple[list[str], int, list[str]]:
        clock = MovableClock(START)
        a = _service(db_url, clock, "host-a", delay=0.05)
        b = _service(db_url, clock, "host-b")
        try:
            await a.recover()
            reply = a.handle(req("What is this?", png()))
            assert isinstance(await anext(reply), Delta)  # A is streaming its answer ...
            restarted = await b.recover()  # ... when B (re)starts
            during = await _statuses(a)
            events = [event async for event in reply]
            assert isinstance(events[-1], Final) and events[-1].kind == "answer"
            return during, restarted, await _statuses(a)
        finally:
            for service in (a, b):
                await service._db.dispose()

    during, restarted, after = asyncio.run(main())
    assert restarted == 0 and during == ["streaming"]
    assert after == ["done"]


def test_answers_of_a_process_that_stopped_are_marked_at_a_heartbeat_or_a_restart(db_url: str) -> None:
    async def main() -> dict[str, Any]:
        clock = MovableClock(START)
        a = _service(db_url, clock, "host-a")
        b = _service(db_url, clock, "host-b")
        local = _service(db_url, clock, b.worker.host, pid=_dead_pid())  # on B's host, and its process is gone
        seen: dict[str, Any] = {}
        try:
            for service in (a, b, local):
                await service.recover()
            for service, thread in ((a, "ta"), (local, "tl")):  # what a crash mid-answer leaves in the database
                conversation = await b._db.get_or_create_conversation(ThreadRef("slack", "T1", "C1", thread))
                await b._db.add_turns(conversation.id, [{"role": "user", "text": "q"},
                                                        {"role": "assistant", "status": "streaming",
                                                         "worker": service.worker.id}])  # fmt: skip
            seen["before"] = await _statuses(b, "ta"), await _statuses(b, "tl")
            seen["restart"] = await _service(db_url, clock, b.worker.host, pid=b.worker.pid + 1).recover()
            seen["after_restart"] = await _statuses(b, "ta"), await _statuses(b, "tl")
            clock.now += timedelta(seconds=STALE_AFTER_S - 1)
            await b.heartbeat()
            seen["fresh"] = await _statuses(b, "ta")
            clock.now += timedelta(seconds=2)  # A's last heartbeat is now older than STALE_AFTER_S
            seen["beat"] = await b.heartbeat()
            seen["after_beat"] = await _statuses(b, "ta")
            return seen
        finally:
            for service in (a, b, local):
                await service._db.dispose()

    seen = asyncio.run(main())
    assert seen["before"] == (["streaming"], ["streaming"])
    # a restart on B's host knows at once that `local`'s process is gone (its pid runs nothing); A is elsewhere
    assert seen["restart"] == 1 and seen["after_restart"] == (["streaming"], ["interrupted"])
    assert seen["fresh"] == ["streaming"]  # within STALE_AFTER_S A may just be slow
    assert seen["beat"] == 1 and seen["after_beat"] == ["interrupted"]


def test_the_pending_answer_records_its_worker(db_url: str) -> None:
    async def main() -> list[str | None]:
        service = _service(db_url, MovableClock(START), "host-a")
        try:
            await service.recover()
            [event async for event in service.handle(req("What is this?", png()))]
            conversation = await service._db.live_conversation(ThreadRef("slack", "T1", "C1", "t1"))
            return [t.worker for t in await service._db.turns(conversation.id)]
        finally:
            await service._db.dispose()

    assert asyncio.run(main()) == [None, "host-a:4242:x"]
