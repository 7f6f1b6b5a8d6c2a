"""Fault injection, text: NUL, other control characters and lone surrogates in what users send and in what
the model emits are stored and answered on SQLite and on a real PostgreSQL (which rejects ``\\x00`` in
text), and nothing dirty reaches a platform — deltas, answers, errors, help, presets, stored errors.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from PIL import Image

from bot.core.config import Settings
from bot.core.requests import Delta, Final, ImageAttachment, Request, ThreadRef
from bot.core.service import BotService
from model.engine.contract import RequestFailed
from storage import Database
from tests.scripted_backend import ScriptedBackend

DIRTY = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")  # what may never be stored or sent (\t and \n may)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_clean(*texts: str | None) -> None:
    for text in texts:
        assert text is None or not DIRTY.search(text), repr(text)
        assert text is None or text.encode("utf-8")  # strict: no surrogates


Run = Callable[[Callable[[BotService, Database, ScriptedBackend], Awaitable[Any]]], Any]


@pytest.fixture
def run(db_url: str) -> Callable[..., Any]:
    """``run(fn, settings=None)``: ``await fn(service, db, backend)`` on SQLite and on PostgreSQL."""

    def go(fn: Callable[[BotService, Database, ScriptedBackend], Awaitable[Any]], settings: dict | None = None) -> Any:
        async def main() -> Any:
            db = Database(db_url)
            backend = ScriptedBackend()
            try:
                return await fn(BotService(Settings.model_validate(settings or {}), db, backend), db, backend)
            finally:
                await db.dispose()

        return asyncio.run(main())

    return go


async def ask(service: BotService, request: Request) -> list[Any]:
    return [event async for event in service.handle(request)]


async def stored(db: Database, platform: str, workspace: str, channel: str, thread: str) -> list[Any]:
    conversation = await db.live_conversation(ThreadRef(platform, workspace, channel, thread))
    return await db.turns(conversation.id) if conversation is not None else []


def test_fault_nul_and_controls_in_user_text_are_stored_and_answered(run) -> None:
    async def fn(service: BotService, db: Database, _backend: ScriptedBackend) -> None:
        request = Request(
            platform="web",
            workspace="W\x00",
            channel="C\x1b1",
            thread="t\x00\ud8001",
            user="al\x00ice\u2028",
            text="what\x00 is this?\x07\r\nline two\x1b[31m\x7f\tend \ud83d",
            images=(ImageAttachment(png(), filename="pic\x00\ud800.png"),),
            event_id="ev\x00-1",
        )
        events = await ask(service, request)
        final = events[-1]
        assert isinstance(final, Final) and final.kind == "answer" and final.text == "A red circle."
        turns = await stored(db, "web", "W", "C1", "t\ufffd1")
        assert [(t.role, t.status) for t in turns] == [("user", "done"), ("assistant", "done")]
        # ids are normalised (U+2028 is no part of a name), the text keeps its line break
        assert turns[0].text == "what is this?\nline two[31m\tend \ufffd" and turns[0].user_id == "alice"
        assert turns[1].text == "A red circle."
        usage = await db.usage_since("web", "W", "alice", db.now().replace(hour=0, minute=0))
        assert usage.requests == 1 and usage.images == 1
        assert await ask(service, request) == []  # the cleaned event id was recorded: a redelivery is dropped

        # A NUL in a preset name picked in a UI, and in a follow-up.
        follow = Request("web", "W", "C1", "t\ufffd1", "alice", "\x00and\x00 the colour?", preset="poem\x00")
        (*_deltas, answer) = await ask(service, follow)
        assert answer.kind == "answer"
        turns = await stored(db, "web", "W", "C1", "t\ufffd1")
        assert turns[2].text.startswith("Write a poem") and turns[2].text.endswith("and the colour?")
        for event in events:
            assert_clean(event.text)

    run(fn)


def test_fault_nul_and_controls_in_model_output_are_stored_and_answered(run) -> None:
    """Byte tokens that decode to NUL (the demo weights emit them every few answers), ESC, DEL, a CRLF and a
    surrogate pair split over tokens, a lone surrogate: streamed clean, stored, fed back as history."""

    async def fn(service: BotService, db: Database, backend: ScriptedBackend) -> None:
        backend.script = [
            ["A", "\x00", " red", "\x1b[0m", " circle", "\r", "\n", "\ud83d", "\ude00", "\x7f", " \ud800", "."],
            ["Still\x00 red.\x00"],
            ["\x00\x01\x02"],  # nothing printable at all
        ]
        thread = Request("slack", "T1", "C1", "t1", "alice", "What is this?", (ImageAttachment(png()),))
        first = await ask(service, thread)
        deltas = [e.text for e in first if isinstance(e, Delta)]
        final = first[-1]
        assert final.kind == "answer" and final.text == "A red[0m circle\n\U0001f600 \ufffd."
        assert "".join(deltas) == final.text  # the streamed text is the stored text, split anywhere
        assert_clean(*deltas, final.text)

        second = await ask(service, Request("slack", "T1", "C1", "t1", "alice", "Sure?"))
        assert second[-1].kind == "answer" and second[-1].text == "Still red."
        third = await ask(service, Request("slack", "T1", "C1", "t1", "alice", "And?"))
        assert third[-1].kind == "answer" and third[-1].text == "(no answer)"

        turns = await stored(db, "slack", "T1", "C1", "t1")
        assert [(t.role, t.status) for t in turns] == [("user", "done"), ("assistant", "done")] * 3
        assert [t.text for t in turns if t.role == "assistant"] == [final.text, "Still red.", ""]
        history = backend.calls[-1]["turns"]  # the stored answers go back to the model, clean
        assert [t["text"] for t in history if t["role"] == "assistant"] == [final.text, "Still red."]

    run(fn)


def test_fault_error_texts_and_configured_texts_are_clean(run, caplog) -> None:
    """A backend error whose repr is raw bytes is stored as a clean ``error``; preset prompts and names from
    bot.toml (where "\\u0000" is valid TOML) are clean in what is stored and in help and preset lists."""

    class Nasty(RequestFailed):
        def __repr__(self) -> str:
            return "Nasty('\x00\ud800 model said\x1b[2J')"

    settings = {"presets": {"prompts": {"describe": "Describe\x00 it.\x1b", "po\x07em": "A poem\x00."},
                            "default": "describe"}}  # fmt: skip

    async def fn(service: BotService, db: Database, backend: ScriptedBackend) -> None:
        backend.fail = Nasty("boom")
        failed = await ask(service, Request("slack", "T1", "C1", "t1", "alice", "", (ImageAttachment(png()),)))
        assert failed[-1].kind == "error"
        turns = await stored(db, "slack", "T1", "C1", "t1")
        assert turns[0].text == "Describe it." and turns[1].status == "failed"
        assert turns[1].error == "Nasty('\ufffd model said[2J')"
        assert_clean(turns[1].error, *(e.text for e in failed))

        assert {p.name: p.prompt for p in service.presets()} == {"describe": "Describe it.", "poem": "A poem."}
        assert_clean(service.help_text(), service.default_preset)
        help_reply = await ask(service, Request("slack", "T1", "C1", "t2", "alice", "help"))
        assert_clean(help_reply[-1].text)
        settings_reply = await ask(service, Request("slack", "T1", "C1", "t2", "alice", "settings"))
        assert settings_reply[-1].kind == "notice" and "Presets: describe, poem" in settings_reply[-1].text

    run(fn, settings)


def test_fault_files_with_replies_have_clean_names() -> None:
    """Whatever a reply carries to a platform besides its text — file names and captions — is cleaned too."""
    from bot.core.requests import ReplyFile
    from bot.core.service import _clean_reply

    final = Final("ok\x00", files=(ReplyFile("page\x00.html", "text/html", b"<p>", title="Page\x07 \ud800"),))
    cleaned = _clean_reply(final)
    assert cleaned.text == "ok"
    assert cleaned.files[0].filename == "page.html" and cleaned.files[0].title == "Page \ufffd"
