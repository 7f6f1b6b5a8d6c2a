"""Typed commands (issue 22 item 1): a front end's own command objects set ``Request.command``; the core
then reads no command words in the text, and a ``settings``/``help`` follows no thread."""

from __future__ import annotations

import pytest

from bot.core.commands import Command, ParsedMessage, parse_request
from bot.core.config import DEFAULT_PRESETS
from bot.core.requests import ThreadRef
from tests.bot import test_service
from tests.bot.test_service import Harness, png, req

run = test_service.run  # the core on SQLite and on PostgreSQL, with a scripted backend
PRESETS = list(DEFAULT_PRESETS)


@pytest.mark.parametrize(
    ("command", "text", "preset", "expected"),
    [
        (None, "settings", None, ParsedMessage(command=Command.SETTINGS)),  # a plain message: the text decides
        (None, "/reset", None, ParsedMessage(command=Command.RESET)),
        (Command.ASK, "settings", None, ParsedMessage(question="settings")),  # a question, not a command
        (Command.ASK, "help", "story", ParsedMessage(preset="story", question="help")),  # the explicit preset
        (Command.ASK, "/reset", None, None),  # "/reset" is no preset: told, as any unknown /word
        (Command.ASK, "story", None, ParsedMessage(preset="story")),  # presets in the question still apply
        (Command.ASK, "/poem about rain", "story", ParsedMessage(preset="poem", question="about rain")),
        (Command.SETTINGS, "", None, ParsedMessage(command=Command.SETTINGS)),
        (Command.RESET, "What is this?", None, ParsedMessage(command=Command.RESET)),  # the text is not read
        ("help", "", None, ParsedMessage(command=Command.HELP)),  # a plain str of the enum is the command
    ],
)
def test_a_typed_command_is_taken_as_it_is(command, text, preset, expected) -> None:
    if expected is None:
        with pytest.raises(KeyError, match="/reset"):
            parse_request(command, text, PRESETS, preset)
        return
    assert parse_request(command, text, PRESETS, preset) == expected


def test_an_unknown_typed_command_is_refused() -> None:
    with pytest.raises(KeyError, match="teleport"):
        parse_request("teleport", "", PRESETS)


def test_ask_with_a_command_word_as_the_question_asks_about_the_picture(run):
    async def fn(h: Harness):
        (*_, final) = await h.ask(req("settings", png(), command=Command.ASK, addressed=True))
        assert final.kind == "answer"  # not the settings notice: the picture was asked about
        assert h.backend.calls[-1]["turns"][-1] == {"role": "user", "text": "settings", "image": True}
        assert [t.image_id is not None for t in await h.turns()] == [True, False]
        assert await h.db.is_followed(ThreadRef("slack", "T1", "C1", "t1"))  # an ask is addressed

    run(fn)


def test_typed_settings_and_help_follow_no_thread(run):
    async def fn(h: Harness):
        (settings,) = await h.ask(req(thread="", command=Command.SETTINGS, addressed=True))
        assert settings.kind == "notice" and "Your limits:" in settings.text
        (shown,) = await h.ask(req("What is this?", thread="t2", command=Command.HELP, addressed=True))
        assert shown.kind == "help" and h.backend.calls == []
        for thread in ("", "t2"):
            assert not await h.db.is_followed(ThreadRef("slack", "T1", "C1", thread))
        (plain,) = await h.ask(req("settings", thread="t3", addressed=True))  # a mention saying settings: as today
        assert plain.kind == "notice" and await h.db.is_followed(ThreadRef("slack", "T1", "C1", "t3"))

    run(fn)


def test_typed_reset_starts_the_thread_over_whatever_the_text(run):
    async def fn(h: Harness):
        await h.ask(req("What is this?", png()))
        (notice,) = await h.ask(req("", command=Command.RESET, addressed=True))
        assert notice.kind == "notice" and "Starting over" in notice.text and await h.turns() == []
        assert await h.db.is_followed(ThreadRef("slack", "T1", "C1", "t1"))

    run(fn)
