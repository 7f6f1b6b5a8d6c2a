"""Preset words do not take over sentences (issue 26, item 8): a preset is a preset only as a command —
the message is its name alone, or ``/name …`` (``!name …``), or the front end picked it for this message."""

from __future__ import annotations

import pytest

from bot.core.commands import ParsedMessage as Command
from bot.core.commands import parse_message
from bot.core.config import DEFAULT_PRESETS
from tests.bot import test_service
from tests.bot.test_service import Harness, png, req

run = test_service.run  # the core on SQLite and on PostgreSQL, with a scripted backend
PRESETS = list(DEFAULT_PRESETS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("story", Command(preset="story")),
        ("  Story. ", Command(preset="story")),
        ("/story about a cat", Command(preset="story", question="about a cat")),
        ("!Story about a cat", Command(preset="story", question="about a cat")),
        ("/describe", Command(preset="describe")),
        ("help", Command(command="help")),
        ("Help?", Command(command="help")),
        ("/reset", Command(command="reset")),
        ("Describe the roof please", Command(question="Describe the roof please")),
        ("Story time: tell me one", Command(question="Story time: tell me one")),
        ("recipe: what can I cook?", Command(question="recipe: what can I cook?")),
        ("help me read this sign", Command(question="help me read this sign")),
        ("!wow, what is that?", Command(question="!wow, what is that?")),
        ("/etc/hosts is shown here?", Command(question="/etc/hosts is shown here?")),
    ],
)
def test_a_preset_is_a_preset_only_as_a_command(text: str, expected: Command) -> None:
    assert parse_message(text, PRESETS) == expected


def test_a_preset_picked_by_the_front_end_applies_to_the_message_as_written() -> None:
    assert parse_message("make it shorter", PRESETS, "story") == Command(preset="story", question="make it shorter")
    assert parse_message("poem", PRESETS, "story") == Command(preset="story", question="poem")
    assert parse_message("/poem about rain", PRESETS, "story") == Command(preset="poem", question="about rain")
    assert parse_message("help", PRESETS, "story") == Command(command="help")
    with pytest.raises(KeyError, match="limerick"):
        parse_message("x", PRESETS, "limerick")


def test_an_unknown_slash_word_is_told_not_asked() -> None:
    with pytest.raises(KeyError, match="/teleport"):
        parse_message("/teleport me", PRESETS)


def test_sentences_that_start_with_a_preset_word_reach_the_model_as_written(run):
    async def fn(h: Harness):
        await h.ask(req("Describe the roof please", png()))
        assert h.backend.calls[-1]["turns"][-1]["text"] == "Describe the roof please"
        await h.ask(req("story", png(), thread="t2"))
        assert h.backend.calls[-1]["turns"][-1]["text"].startswith("Write a short story")
        await h.ask(req("/story about a cat", png(), thread="t3"))
        assert h.backend.calls[-1]["turns"][-1]["text"].endswith(" about a cat")
        (unknown,) = await h.ask(req("/teleport", png(), thread="t4"))
        assert unknown.kind == "notice" and "/teleport" in unknown.text and "help" in unknown.text
        (helped,) = await h.ask(req("help"))
        assert "/story about a cat" in helped.text and "`" not in helped.text
        assert len(h.backend.calls) == 3

    run(fn)
