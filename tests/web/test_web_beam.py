"""Beam search streams through the same events as sampling (issue 16, 3b): core + web API + the real engine.

``[generation] num_beams = 2``: the engine runs the search alone, then sends the best beam's tokens as
ordinary token events in one burst and the final event; the web API turns them into ``delta`` events and a
``final`` whose text is the deltas joined — exactly the shape a sampling answer has.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from web_helpers import make_settings, parse_sse, png_bytes, start_demo_engine

from adapters.web import create_app
from bot.core.service import BotService
from model.engine.local_backend import EngineBackend
from storage import Database, sqlite_url


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    running = start_demo_engine(tmp_path_factory.mktemp("beam-demo"))
    yield running
    running.stop()


async def _ask(engine: Any, folder: Path, generation: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    db = Database(sqlite_url(folder / f"beam-{uuid.uuid4().hex[:8]}.db"))
    await db.create_all()
    service = BotService(make_settings(generation=generation), db, EngineBackend(engine, info={"demo": True}))
    client = TestClient(TestServer(create_app(service)))
    await client.start_server()
    try:
        data = aiohttp.FormData(default_to_multipart=True)
        data.add_field("thread", "t-beam")
        data.add_field("text", "What is this?")
        data.add_field("event_id", uuid.uuid4().hex)
        data.add_field("image", png_bytes((10, 120, 200)), filename="p.png", content_type="image/png")
        response = await client.post("/api/messages", data=data)
        assert response.status == 200, await response.text()
        return parse_sse(await response.text())
    finally:
        await client.close()
        await db.dispose()


@pytest.mark.parametrize("num_beams", [1, 2])
def test_beam_search_streams_deltas_and_a_final_like_sampling(engine: Any, tmp_path: Path, num_beams: int) -> None:
    generation = {"num_beams": num_beams, "do_sample": False, "max_new_tokens": 6, "min_length": 7}
    events = asyncio.run(_ask(engine, tmp_path, generation))
    names = [name for name, _ in events]
    assert names[-1] == "final" and names.count("final") == 1, names
    assert set(names[:-1]) == {"delta"} and len(names) > 2, names  # several token deltas, then the final
    final = events[-1][1]
    assert final["kind"] == "answer" and final["meta"]["tokens"] == 6, final
    joined = "".join(data["text"] for name, data in events if name == "delta")
    assert joined.strip() == final["text"] != "", (joined, final["text"])
