"""Who the web chat answers (issue 26, items 14 and 15b), over real HTTP on loopback (``run_web`` + aiohttp):
a foreign Host (DNS rebinding) and a cross-site Origin are refused before anything is stored, and the
web user is the trusted auth proxy's header when configured, else the one local user (never a form field)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from web_helpers import make_settings, parse_sse, png_bytes

from adapters.web import WebSettings, run_web
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests.scripted_backend import ScriptedBackend


def message(thread: str, text: str = "What is it?", user: str = "Mallory") -> aiohttp.FormData:
    data = aiohttp.FormData(default_to_multipart=True)
    for name, value in (("thread", thread), ("text", text), ("user", user), ("event_id", uuid.uuid4().hex)):
        data.add_field(name, value)
    data.add_field("image", png_bytes((10, 20, 30)), filename="p.png", content_type="image/png")
    return data


async def served(folder: Path, fn: Any, **web: Any) -> Any:
    db = Database(sqlite_url(folder / f"guard-{uuid.uuid4().hex[:6]}.db"))
    await db.create_all()
    service = BotService(make_settings(), db, ScriptedBackend())
    runner = await run_web(service, "127.0.0.1", 0, **web)
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            return await fn(http, base, db)
    finally:
        await runner.cleanup()
        await db.dispose()


async def stored_users(db: Database) -> list[str | None]:
    conversations = await db.list_conversations(platform="web", limit=100)
    return [t.user_id for c, _ in conversations for t in await db.turns(c.id) if t.role == "user"]


def test_foreign_host_and_cross_site_origin_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="adapters.web")

    async def fn(http: aiohttp.ClientSession, base: str, db: Database) -> None:
        port = base.rsplit(":", 1)[1]
        refused = {
            "rebinding": {"Host": "evil.example"},
            "rebinding with port": {"Host": f"evil.example:{port}"},
            "cross-site form": {"Origin": "http://evil.example"},
            "other local port": {"Origin": "http://127.0.0.1:1"},
            "sandboxed page": {"Origin": "null"},
            "cross-site fetch metadata": {"Sec-Fetch-Site": "cross-site"},
        }
        for case, headers in refused.items():
            response = await http.post(f"{base}/api/messages", data=message(f"t-{case[:5]}"), headers=headers)
            assert response.status == 403, case
            assert "error" in await response.json(), case
        # DNS rebinding reads nothing either; probes (asked by IP, by orchestrators) still answer.
        assert (await http.get(f"{base}/api/threads/t-x", headers={"Host": "evil.example"})).status == 403
        assert (await http.get(f"{base}/", headers={"Host": "evil.example"})).status == 403
        assert (await http.get(f"{base}/healthz", headers={"Host": "10.1.2.3:8080"})).status == 200
        assert await stored_users(db) == []
        # The page's own origin, loopback names, and scripts without an Origin are answered.
        for headers in ({"Origin": base}, {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}, {}):
            response = await http.post(f"{base}/api/messages", data=message("t-ok"), headers=headers)
            assert response.status == 200, headers
            assert parse_sse(await response.text())[-1][1]["kind"] == "answer"

    asyncio.run(served(tmp_path, fn))
    assert sum("refused" in r.getMessage() for r in caplog.records) == 8  # one line each


def test_allowed_hosts_admit_the_proxy_name(tmp_path: Path) -> None:
    async def fn(http: aiohttp.ClientSession, base: str, _db: Database) -> None:
        headers = {"Host": "chat.example.com", "Origin": "https://chat.example.com"}
        response = await http.post(f"{base}/api/messages", data=message("t-proxy"), headers=headers)
        assert response.status == 200
        assert (await http.get(f"{base}/", headers={"Host": "other.example.com"})).status == 403

    asyncio.run(served(tmp_path, fn, allowed_hosts=["chat.example.com"]))
    with pytest.raises(ValueError, match="not a host name"):
        WebSettings(allowed_hosts=["https://chat.example.com/"])


def test_the_web_user_is_never_the_client_s_choice(tmp_path: Path) -> None:
    async def fn(http: aiohttp.ClientSession, base: str, db: Database) -> None:
        for name in ("Mallory", "q1", "Q1\u200b"):
            response = await http.post(f"{base}/api/messages", data=message(f"t-{uuid.uuid4().hex[:6]}", user=name))
            assert response.status == 200
            await response.read()
        assert await stored_users(db) == ["local", "local", "local"]

    asyncio.run(served(tmp_path, fn))


def test_the_web_user_comes_from_the_auth_proxy_header(tmp_path: Path) -> None:
    async def fn(http: aiohttp.ClientSession, base: str, db: Database) -> None:
        response = await http.post(f"{base}/api/messages", data=message("t-anon"))
        assert response.status == 401  # not through the proxy: no answer, nothing stored
        assert (await http.get(f"{base}/api/threads/t-anon")).status == 401
        assert (await http.get(f"{base}/")).status == 200  # the page itself loads (it shows the refusal)
        for who in ("Alice", "alice\u200b", "ALICE"):
            form = message(f"t-{who[:3]}", user="bob")
            response = await http.post(f"{base}/api/messages", data=form, headers={"X-Forwarded-User": who})
            assert response.status == 200
            await response.read()
        assert await stored_users(db) == ["alice", "alice", "alice"]

    asyncio.run(served(tmp_path, fn, user_header="X-Forwarded-User"))


def test_behind_the_proxy_a_thread_is_its_starter_s_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 26: the history and picture reads were keyed by the thread id alone, so with a login proxy user B
    read user A's conversation (and its picture) by knowing the id; a message into it continued it."""

    async def fn(http: aiohttp.ClientSession, base: str, db: Database) -> None:
        alice, bob = {"X-Forwarded-User": "Alice"}, {"X-Forwarded-User": "bob"}
        response = await http.post(f"{base}/api/messages", data=message("t-alice", "What is it?"), headers=alice)
        assert response.status == 200
        await response.read()
        mine = await http.get(f"{base}/api/threads/t-alice", headers={"X-Forwarded-User": "ALICE"})  # same user
        turns = (await mine.json())["turns"]
        assert mine.status == 200 and [t["role"] for t in turns] == ["user", "assistant"]
        picture = turns[0]["image"]
        assert (await http.get(f"{base}{picture}", headers=alice)).status == 200

        caplog.clear()
        history = await http.get(f"{base}/api/threads/t-alice", headers=bob)
        assert history.status == 404 and "What is it" not in await history.text()
        stolen = await http.get(f"{base}{picture}", headers=bob)
        assert stolen.status == 404 and await stolen.json() == {"error": "No such picture in this thread."}
        follow_up = await http.post(f"{base}/api/messages", data=message("t-alice", "And now?"), headers=bob)
        assert follow_up.status == 403 and "New chat" in (await follow_up.json())["error"]
        assert len([r for r in caplog.records if "started by another user" in r.getMessage()]) == 3
        assert await stored_users(db) == ["alice"]  # nothing of Bob's was stored in Alice's thread

        fresh = await http.get(f"{base}/api/threads/t-bob", headers=bob)  # a new page of Bob's: empty, not 404
        assert fresh.status == 200 and (await fresh.json())["turns"] == []
        response = await http.post(f"{base}/api/messages", data=message("t-bob"), headers=bob)
        assert response.status == 200
        await response.read()
        assert (await http.get(f"{base}/api/threads/t-bob", headers=alice)).status == 404
        assert len((await (await http.get(f"{base}/api/threads/t-bob", headers=bob)).json())["turns"]) == 2

    asyncio.run(served(tmp_path, fn, user_header="X-Forwarded-User"))


def test_without_a_proxy_the_one_local_user_reads_every_thread(tmp_path: Path) -> None:
    async def fn(http: aiohttp.ClientSession, base: str, db: Database) -> None:
        response = await http.post(f"{base}/api/messages", data=message("t-local"))
        assert response.status == 200
        await response.read()
        turns = (await (await http.get(f"{base}/api/threads/t-local")).json())["turns"]
        assert len(turns) == 2 and (await http.get(f"{base}{turns[0]['image']}")).status == 200

    asyncio.run(served(tmp_path, fn))
