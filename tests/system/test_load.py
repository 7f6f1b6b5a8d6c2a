"""Load: 200 concurrent conversations through the local web API on demo weights, two turns each.

Every turn must be stored exactly once — including when clients retry a message with the
same event id — and every answer must be complete.
"""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp

from adapters.web import run_web
from bot.core.config import Settings
from bot.core.service import BotService
from model.engine import Engine
from model.engine.local_backend import EngineBackend
from storage import Database, sqlite_url
from tests.pictures import png

CONVERSATIONS = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(i: int) -> bytes:
    return png((i % 256, (7 * i) % 256, 90), (48, 40))


async def _post(http: aiohttp.ClientSession, url: str, fields: dict, image: bytes | None) -> list[tuple[str, dict]]:
    form = aiohttp.FormData()
    for key, value in fields.items():
        form.add_field(key, value)
    if image is not None:
        form.add_field("image", image, filename="p.png", content_type="image/png")
    events = []
    headers = {"X-Test-User": fields["user"]}  # each conversation its own user, as a login proxy would say
    async with http.post(url + "/api/messages", data=form, headers=headers) as response:
        assert response.status == 200, await response.text()
        name = None
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_200_concurrent_conversations_store_every_turn_once(demo_models, tmp_path):
    settings = Settings.model_validate(
        {
            "generation": {"max_new_tokens": 4, "do_sample": False},
            "engine": {"max_batch": 32, "max_queue": 1000, "max_wait_s": 3600, "max_prefills_per_step": 8},
            "quotas": {"user": {"requests_per_day": 0, "images_per_day": 0}},
        }
    )

    async def main():
        from bot.cli.serve import engine_config

        db = Database(sqlite_url(tmp_path / "load.db"))
        await db.create_all()
        port = _free_port()
        async with Engine(demo_models["vicuna0"], engine_config(settings)) as engine:
            service = BotService(settings, db, EngineBackend(engine))
            runner = await run_web(service, "127.0.0.1", port, user_header="X-Test-User")
            url = f"http://127.0.0.1:{port}"
            try:
                connector = aiohttp.TCPConnector(limit=CONVERSATIONS)
                timeout = aiohttp.ClientTimeout(total=600)
                async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

                    async def conversation(i: int) -> list[list[tuple[str, dict]]]:
                        thread = f"load-{i}"
                        first = {"thread": thread, "text": "What is this?", "user": f"user{i}", "event_id": f"{i}-a"}
                        replies = [await _post(http, url, first, _png(i))]
                        if i % 10 == 0:  # a client retrying the same message: must not answer twice
                            replies.append(await _post(http, url, first, _png(i)))
                        second = {"thread": thread, "text": "Tell me more.", "user": f"user{i}", "event_id": f"{i}-b"}
                        replies.append(await _post(http, url, second, None))
                        return replies

                    results = await asyncio.gather(*(conversation(i) for i in range(CONVERSATIONS)))
            finally:
                await runner.cleanup()
            conversations = await db.list_conversations(platform="web", limit=10 * CONVERSATIONS)
            stored = {c.thread: await db.turns(c.id) for c, _ in conversations}
            snapshot = engine.snapshot()
        await db.dispose()
        return [r for conv in results for r in conv], stored, snapshot

    finals, stored, snapshot = asyncio.run(main())
    retried = CONVERSATIONS // 10
    answers = [events for events in finals if events and events[-1][0] == "final"]
    duplicates = [events for events in finals if events and events[0][0] == "duplicate"]
    assert len(answers) == 2 * CONVERSATIONS
    assert len(duplicates) == retried
    assert all(events[-1][1]["kind"] == "answer" for events in answers)
    for events in answers:  # the streamed text is the stored answer
        streamed = "".join(data["text"] for name, data in events if name == "delta")
        assert streamed.strip() == events[-1][1]["text"] or events[-1][1]["text"] == "(no answer)"
    assert len(stored) == CONVERSATIONS
    for thread, turns in stored.items():
        assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"], thread
        assert [t.seq for t in turns] == [1, 2, 3, 4]
        assert all(t.status == "done" for t in turns)
        assert turns[0].image_id is not None and turns[2].image_id is None
        assert turns[1].completion_tokens > 0 and turns[3].completion_tokens > 0
    assert snapshot["finished"] == 2 * CONVERSATIONS
    assert snapshot["prefix_cache_hit_rate"] > 0.3  # follow-ups reused their thread's KV prefix
