"""Fault injection, front ends and engine: readiness names each failing check (a front end that lost its
connection, one whose check hangs or raises, a model backend that stops answering), and the Slack front
end reports its Socket Mode connection and its Events API listener as they are.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from bot.core.config import Settings
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests.pg import create_schema
from tests.scripted_backend import ScriptedBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slack"))  # the Slack tests' fake and helpers
from slack_helpers import slack_env


def test_fault_readiness_names_each_failing_check(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "ready.db")
    create_schema(url)

    class Flaky(ScriptedBackend):
        broken = False

        def stats(self) -> dict[str, Any]:
            if self.broken:
                raise RuntimeError("engine thread died")
            return super().stats()

    async def hangs() -> str | None:
        await asyncio.sleep(30)
        return None

    def raises() -> str | None:
        raise RuntimeError("bug in a check")

    async def main() -> None:
        db = Database(url)
        backend = Flaky()
        service = BotService(Settings.model_validate({}), db, backend)
        service.READY_CHECK_TIMEOUT_S = 0.2
        try:
            state = {"gateway": None}

            async def gateway() -> str | None:
                return state["gateway"]

            service.watch_front_end("chat", gateway)
            ready = await service.readiness()
            assert ready.ok and ready.checks == {"database": "ok", "engine": "ok", "chat": "ok"}
            assert ready.model["variant"] == "vicuna0" and ready.engine == {"queue_depth": 0, "batch_size": 0}

            state["gateway"] = "gateway disconnected\x00"
            service.watch_front_end("slow", hangs)
            service.watch_front_end("buggy", raises)
            backend.broken = True
            started = time.monotonic()
            ready = await service.readiness()
            assert time.monotonic() - started < 2
            assert not ready.ok and ready.checks == {
                "database": "ok",
                "engine": "the model backend did not answer",
                "chat": "gateway disconnected",
                "slow": "no answer within 0.2 s",
                "buggy": "the check failed (RuntimeError)",
            }
            text = service.metrics_text().decode()
            assert "minigpt4_ready 0.0" in text and 'minigpt4_check_ok{check="database"} 1.0' in text
            assert 'minigpt4_check_ok{check="chat"} 0.0' in text and 'minigpt4_check_ok{check="engine"} 0.0' in text
            assert (await service.health()).ok is False  # liveness: the backend does not describe itself…
            backend.broken = False
            assert (await service.health()).ok  # …and it is back; health never asks the database
        finally:
            await db.dispose()

    asyncio.run(main())


def test_fault_slack_socket_mode_readiness_follows_the_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with slack_env(tmp_path, backend=ScriptedBackend()) as env:
            env.service.watch_front_end(env.adapter.name, env.adapter.problem)
            assert await env.adapter.problem() is None
            assert (await env.service.readiness()).checks["slack"] == "ok"

            await env.fake.close()  # Slack goes away: the websocket closes and reconnecting fails
            deadline = time.monotonic() + 10
            while (problem := await env.adapter.problem()) is None:
                assert time.monotonic() < deadline, "the lost Socket Mode connection was not noticed"
                await asyncio.sleep(0.05)
            assert problem == "Socket Mode connection lost (reconnecting)"
            ready = await env.service.readiness()
            assert not ready.ok and ready.checks["slack"] == problem

            await env.adapter.stop()
            assert await env.adapter.problem() == "Socket Mode not connected"

    asyncio.run(main())


def test_fault_slack_events_api_readiness_follows_the_listener(tmp_path: Path) -> None:
    async def main() -> None:
        async with slack_env(tmp_path, backend=ScriptedBackend(), mode="http") as env:
            assert await env.adapter.problem() is None
            await env.adapter.stop()
            assert await env.adapter.problem() == "Events API not listening on /slack/events"

    asyncio.run(main())
