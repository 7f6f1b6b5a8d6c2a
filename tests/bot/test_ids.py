"""Ids are spelled one way in the core (issue 26, item 15a): ``Q1``, ``q1`` and ``q1`` + zero-width space are
one web user for quotas and access rules; Slack's opaque ids keep their case."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.core.config import Settings
from bot.core.requests import ImageAttachment, Request, ThreadRef, normalize_id, normalize_user
from bot.core.service import BotService
from storage import Database, sqlite_url
from tests.pictures import png
from tests.scripted_backend import ScriptedBackend

SPELLINGS = ("Q1", "q1", "q1\u200b", "\uff31\uff11", " Q1\u00ad ", "q\u200d1")
PICTURE = png((9, 9, 9), (8, 8))


def test_ids_are_normalised_per_platform() -> None:
    assert {normalize_user("web", s) for s in SPELLINGS} == {"q1"}
    assert {normalize_user("terminal", s) for s in SPELLINGS} == {"q1"}
    assert {normalize_user("slack", s) for s in SPELLINGS} == {"Q1", "q1"}  # opaque: case kept
    assert normalize_user("discord", "1234\u200b5") == "12345"
    request = Request("web", "local", "chat\u200b", "t\u200b1", "Mallory\u2060", roles=("R\u200b1",))
    assert (request.channel, request.thread, request.user, request.roles) == ("chat", "t1", "mallory", ("R1",))
    assert request.ref == ThreadRef("web", "local", "chat", "t1\u200b")
    assert all(normalize_id(normalize_id(s, fold_case=True), fold_case=True) == normalize_id(s, fold_case=True)
               for s in (*SPELLINGS, "Straße", "ǅ"))  # fmt: skip


def test_control_characters_go_before_whitespace_is_collapsed() -> None:
    # "\x1f" is whitespace to str.split but a control to clean_text: one order, one spelling everywhere.
    for raw, kept in (("0\x1f0", "00"), ("a\x08b", "ab"), ("a\r\nb", "a b"), ("x\ud800", "x\ufffd")):
        assert normalize_id(raw) == kept == normalize_id(kept)
        assert Request("web", "W", raw, raw, "u").ref == ThreadRef("web", "W", kept, kept)


def test_one_user_for_quotas_and_deny_rules_however_spelled(tmp_path: Path) -> None:
    async def main() -> None:
        db = Database(sqlite_url(tmp_path / "ids.db"))
        await db.create_all()
        settings = Settings.model_validate({"quotas": {"user": {"requests_per_day": 2, "images_per_day": 0}}})
        service = BotService(settings, db, ScriptedBackend())

        async def ask(user: str, thread: str) -> str:
            request = Request("web", "local", "chat", thread, user, "What is it?", (ImageAttachment(PICTURE),))
            events = [e async for e in service.handle(request)]
            return events[-1].kind + ": " + events[-1].text

        await db.add_rule("deny", "user", "web", "MALLORY")  # as an admin types it
        try:
            replies = [await ask(user, f"t{i}") for i, user in enumerate(SPELLINGS[:3])]
            assert [r.split(":")[0] for r in replies] == ["answer", "answer", "error"], replies
            assert "limit" in replies[2].lower()
            assert "not enabled for you" in await ask("mallory\u200b", "t9")
            assert "not enabled for you" in await ask("Ｍａｌｌｏｒｙ", "t10")
        finally:
            await db.dispose()

    asyncio.run(main())


def test_the_front_end_says_whether_its_user_ids_fold_case(tmp_path: Path, monkeypatch) -> None:
    """The core names no platform (issue 26): a front end declares ``case_insensitive_users`` in its
    FrontEndPlugin and requests, access rules and quota overrides follow it.  Two third-party front ends,
    installed as real entry points, one with login names and one with opaque ids."""
    import sys

    from bot.core import plugins
    from bot.core.requests import user_ids_fold_case

    (tmp_path / "kiosk_frontends.py").write_text(
        "from bot.core.frontend_api import FrontEndPlugin, FrontEndSettings\n"
        "KIOSK = FrontEndPlugin('kiosk', FrontEndSettings, lambda *a: None, case_insensitive_users=True)\n"
        "TICKETS = FrontEndPlugin('tickets', FrontEndSettings, lambda *a: None)\n"
    )
    info = tmp_path / "kiosk_frontends-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kiosk-frontends\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[minigpt4_bot.frontends]\nkiosk = kiosk_frontends:KIOSK\ntickets = kiosk_frontends:TICKETS\n"
    )
    caches = (plugins.plugin_names, plugins.load_plugin, user_ids_fold_case)
    monkeypatch.syspath_prepend(str(tmp_path))
    for cached in caches:
        cached.cache_clear()
    try:
        assert {normalize_user("kiosk", s) for s in SPELLINGS} == {"q1"}
        assert Request("kiosk", "hall", "screen-1", "t1", "Alice\u200b").user == "alice"
        assert {normalize_user("tickets", s) for s in SPELLINGS} == {"Q1", "q1"}
        assert Request("tickets", "desk", "queue", "t1", "Alice").user == "Alice"
        assert normalize_user("nowhere", "Alice") == "Alice"  # no front end of that name: compared exactly
        declared = {name: plugins.load_plugin(plugins.FRONTENDS, name).case_insensitive_users
                    for name in ("web", "terminal", "slack", "discord")}  # fmt: skip
        assert declared == {"web": True, "terminal": True, "slack": False, "discord": False}
    finally:
        monkeypatch.undo()
        for cached in caches:
            cached.cache_clear()
        sys.modules.pop("kiosk_frontends", None)


def test_the_core_names_no_front_end() -> None:
    """No string in bot/core is an installed front end's name: what differs per platform, the front end
    declares (the case-folding of user ids was a set of platform names in bot/core/requests.py)."""
    import ast

    from bot.core.plugins import FRONTENDS, plugin_names

    core = Path(__file__).resolve().parents[2] / "bot" / "core"
    names = set(plugin_names(FRONTENDS))
    assert {"web", "terminal"} <= names
    found = [
        f"{path.name}:{node.lineno} {node.value!r}"
        for path in sorted(core.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    ]
    assert found == []
