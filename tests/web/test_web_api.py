"""The web adapter's HTTP API against a real BotService (SQLite) and a real engine on demo weights."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from web_helpers import jpeg_bytes, make_settings, parse_sse, png_bytes, png_header_only, start_demo_engine

from adapters.web import create_app, run_web, upload_limit
from bot.core.config import Settings
from bot.core.requests import ThreadRef
from bot.core.service import BotService
from model.engine import Engine
from model.engine.local_backend import EngineBackend
from storage import Database, sqlite_url

Image = tuple[str, bytes, str]  # filename, data, content type


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    running = start_demo_engine(tmp_path_factory.mktemp("web-demo"))
    yield running
    running.stop()


@contextlib.asynccontextmanager
async def web_env(engine: Engine, folder: Path, settings: Settings | None = None) -> AsyncIterator[tuple]:
    """A fresh SQLite database, service and test server on this event loop; the engine is shared."""
    db = Database(sqlite_url(folder / f"web-{uuid.uuid4().hex[:8]}.db"))
    await db.create_all()
    service = BotService(settings or make_settings(), db, EngineBackend(engine, info={"demo": True}))
    client = TestClient(TestServer(create_app(service)))
    await client.start_server()
    try:
        yield client, service, db
    finally:
        await client.close()
        await db.dispose()


def form(thread: str, text: str = "", images: list[Image] = (), event_id: str | None = None, preset: str = ""):
    data = aiohttp.FormData(default_to_multipart=True)
    data.add_field("thread", thread)
    data.add_field("text", text)
    data.add_field("preset", preset)
    data.add_field("user", "tester")
    data.add_field("event_id", event_id or uuid.uuid4().hex)
    for name, content, ctype in images:
        data.add_field("image", content, filename=name, content_type=ctype)
    return data


async def post(client: TestClient, *args: Any, **kwargs: Any) -> list[tuple[str, dict[str, Any]]]:
    response = await client.post("/api/messages", data=form(*args, **kwargs))
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return parse_sse(await response.text())


async def thread_turns(db: Database, thread: str) -> list[Any]:
    conversation = await db.live_conversation(ThreadRef("web", "local", "chat", thread))
    return [] if conversation is None else await db.turns(conversation.id)


def only_final(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    assert [name for name, _ in events] == ["final"], events
    return events[0][1]


def test_answer_streams_follow_up_duplicate_and_history(engine: Engine, tmp_path: Path) -> None:
    async def main() -> None:
        async with web_env(engine, tmp_path) as (client, _service, db):
            picture = ("dish.png", png_bytes((200, 40, 0)), "image/png")
            first = await post(client, "t-main", "What can I cook with this?", [picture], event_id="ev-1")
            names = [name for name, _ in first]
            assert names[-1] == "final" and names.count("final") == 1
            assert names.count("delta") >= 1 and set(names[:-1]) == {"delta"}, names
            final = first[-1][1]
            assert final["kind"] == "answer" and final["ephemeral"] is False
            assert final["meta"]["tokens"] == 6 and isinstance(final["meta"]["turn_id"], int)
            assert "".join(d["text"] for n, d in first if n == "delta").strip() == final["text"] != ""

            follow = await post(client, "t-main", "And for dessert?", event_id="ev-2")
            assert follow[-1][0] == "final" and follow[-1][1]["kind"] == "answer"
            turns = await thread_turns(db, "t-main")
            assert [(t.role, t.status) for t in turns] == [
                ("user", "done"), ("assistant", "done"), ("user", "done"), ("assistant", "done"),
            ]  # fmt: skip

            # A retried submit with the same event id: no second answer, nothing stored.
            duplicate = await post(client, "t-main", "What can I cook with this?", [picture], event_id="ev-1")
            assert [name for name, _ in duplicate] == ["duplicate"]
            assert len(await thread_turns(db, "t-main")) == 4

            response = await client.get("/api/threads/t-main")
            assert response.status == 200
            history = (await response.json())["turns"]
            assert [(t["role"], t["has_image"]) for t in history] == [
                ("user", True), ("assistant", False), ("user", False), ("assistant", False),
            ]  # fmt: skip
            assert [t["text"] for t in history] == [
                "What can I cook with this?", final["text"], "And for dessert?", follow[-1][1]["text"],
            ]  # fmt: skip
            assert all(t["status"] == "done" and t["created_at"] for t in history)
            stamps = [t["created_at"] for t in history]
            assert all(s.endswith("+00:00") for s in stamps)  # aware UTC on SQLite too
            assert stamps == sorted(stamps)

            empty = await client.get("/api/threads/never-used")
            assert empty.status == 200 and (await empty.json())["turns"] == []
            assert (await client.get("/api/threads/bad%20id")).status == 400

    asyncio.run(main())


def test_no_image_in_new_thread_is_a_notice(engine: Engine, tmp_path: Path) -> None:
    async def main() -> None:
        async with web_env(engine, tmp_path) as (client, _service, db):
            final = only_final(await post(client, "t-empty", "hello?"))
            assert final["kind"] == "notice"
            assert "I need a picture" in final["text"] and "JPEG, PNG" in final["text"]
            assert await thread_turns(db, "t-empty") == []

    asyncio.run(main())


def test_bad_images_get_clear_notices(engine: Engine, tmp_path: Path) -> None:
    good_jpeg = jpeg_bytes()
    cases: list[tuple[Image, str]] = [
        (("login.jpg", b"<!DOCTYPE html><html><body>Please log in</body></html>", "image/jpeg"), "web page"),
        (("cut.jpg", good_jpeg[: len(good_jpeg) // 2], "image/jpeg"), "truncated or corrupt"),
        (("huge.png", png_header_only(3000, 3000), "image/png"), "3000×3000 pixels"),
        (("noise.bin", bytes(range(7, 256)) * 16, "application/octet-stream"), "not an image I can read"),
        (("notes.txt", b"just some text, not a picture\n" * 20, "text/plain"), "not an image I can read"),
    ]

    async def main() -> None:
        async with web_env(engine, tmp_path) as (client, _service, db):
            for i, (image, expected) in enumerate(cases):
                final = only_final(await post(client, f"t-bad-{i}", "what is this?", [image]))
                assert final["kind"] == "notice", (image[0], final)
                assert expected in final["text"], (image[0], final["text"])
                assert image[0] in final["text"]  # names the file
                assert await thread_turns(db, f"t-bad-{i}") == []
            # A good picture still works afterwards.
            ok = await post(client, "t-good", "and this?", [("ok.jpg", good_jpeg, "image/jpeg")])
            assert ok[-1][1]["kind"] == "answer"

    asyncio.run(main())


def test_upload_over_the_limit_is_413(engine: Engine, tmp_path: Path) -> None:
    async def main() -> None:
        async with web_env(engine, tmp_path) as (client, service, db):
            limit = upload_limit(service)
            assert limit == 2 * 256 * 1024 + 256 * 1024
            big = os.urandom(limit + 1024)
            response = await client.post("/api/messages", data=form("t-big", "hi", [("big.png", big, "image/png")]))
            assert response.status == 413
            body = await response.json()
            assert "too large" in body["error"] and body["limit_bytes"] == limit

            # Without a Content-Length (chunked upload) the limit is enforced while reading.
            boundary = "XyZboundary"

            async def chunked() -> AsyncIterator[bytes]:
                yield (f'--{boundary}\r\nContent-Disposition: form-data; name="thread"\r\n\r\nt-big\r\n').encode()
                yield (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
                    "Content-Type: image/png\r\n\r\n"
                ).encode()
                for _ in range(limit // 65536 + 2):
                    yield b"\0" * 65536
                yield f"\r\n--{boundary}--\r\n".encode()

            response = await client.post(
                "/api/messages",
                data=chunked(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            assert response.status == 413
            assert "too large" in (await response.json())["error"]
            assert await thread_turns(db, "t-big") == []
            assert (await client.get("/healthz")).status == 200  # still serving

            bad = await client.post("/api/messages", data={"text": "no thread"})
            assert bad.status == 400

    asyncio.run(main())


def test_healthz_metrics_and_presets(engine: Engine, tmp_path: Path) -> None:
    settings = make_settings(presets={"prompts": {"describe": "Describe it.", "poem": "A poem, please."}})

    async def main() -> None:
        async with web_env(engine, tmp_path, settings) as (client, _service, _db):
            health = await client.get("/healthz")
            assert health.status == 200
            body = await health.json()
            assert body["status"] == "ok"
            assert body["model"]["variant"] == "vicuna0" and body["model"]["demo"] is True
            assert set(body["engine"]) == {"queue_depth", "batch_size"}
            assert body["engine"]["queue_depth"] == 0

            only_final(await post(client, "t-metrics", "no picture here"))
            metrics = await client.get("/metrics")
            assert metrics.status == 200
            assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await metrics.text()
            assert 'minigpt4_requests_total{outcome="NoImageError",platform="web"} 1.0' in text
            assert "minigpt4_engine_queue_depth" in text

            presets = await (await client.get("/api/presets")).json()
            assert presets["default"] == "describe"
            assert presets["presets"] == [
                {"name": "describe", "prompt": "Describe it."},
                {"name": "poem", "prompt": "A poem, please."},
            ]

            page = await client.get("/")
            assert page.status == 200 and "<title>MiniGPT-4 chat</title>" in await page.text()
            assert "default-src 'none'" in page.headers["Content-Security-Policy"]
            script = await client.get("/static/app.js")
            assert script.status == 200 and "getReader" in await script.text()

    asyncio.run(main())


@pytest.mark.parametrize("cancelling", [True, False], ids=["run_web", "non-cancelling-runner"])
def test_client_disconnect_interrupts_the_answer(
    engine: Engine, tmp_path: Path, cancelling: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """``run_web`` cancels the handler when the client leaves; a plain ``AppRunner`` does not, so there
    the next write fails.  Either way the answer ends ``interrupted`` and the server goes on serving."""
    # Long answers (about 30 s if nothing stopped them) so the disconnect surely lands mid-stream.
    settings = make_settings(generation={"max_new_tokens": 1500, "min_length": 1500})

    async def main() -> None:
        db = Database(sqlite_url(tmp_path / "gone.db"))
        await db.create_all()
        service = BotService(settings, db, EngineBackend(engine))
        if cancelling:
            runner = await run_web(service, "127.0.0.1", 0)
        else:
            runner = web.AppRunner(create_app(service))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession() as http:
                picture = ("cat.png", png_bytes((10, 120, 240)), "image/png")
                response = await http.post(f"{base}/api/messages", data=form("t-gone", "describe", [picture]))
                assert response.status == 200
                first = parse_sse((await response.content.readuntil(b"\n\n")).decode())
                assert first[0][0] == "delta"
                response.close()  # the browser tab goes away

                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    turns = await thread_turns(db, "t-gone")
                    if turns and turns[-1].status not in ("pending", "streaming"):
                        break
                    await asyncio.sleep(0.05)
                assert [(t.role, t.status) for t in turns] == [("user", "done"), ("assistant", "interrupted")]
                assert turns[-1].finish_reason == "interrupted"

                while time.monotonic() < deadline and engine.snapshot()["batch_size"]:
                    await asyncio.sleep(0.05)
                assert engine.snapshot()["batch_size"] == 0  # the engine stopped generating it

                # The server keeps serving: the next message in the thread gets a full answer.
                service.settings.generation = make_settings().generation
                again = await http.post(f"{base}/api/messages", data=form("t-gone", "and now?"))
                events = parse_sse(await again.text())
                assert events[-1][0] == "final" and events[-1][1]["kind"] == "answer"
                statuses = [t.status for t in await thread_turns(db, "t-gone")]
                assert statuses == ["done", "interrupted", "done", "done"]
        finally:
            await runner.cleanup()
            await db.dispose()

    with caplog.at_level(logging.INFO, logger="adapters.web"):
        asyncio.run(main())
    left = "web client left thread t-gone mid-answer" in caplog.text
    assert left is not cancelling  # the write-failure path is the one a non-cancelling server takes


def test_the_web_adapter_does_not_load_torch() -> None:
    code = "import sys, adapters.web\nassert not {'torch', 'transformers'} & set(sys.modules), 'torch loaded'\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
