"""MiniGPT-v2's box answers parsed and cleaned, the identify region, and the task presets (issue 24).

The formats are the reference's (Vision-CAIR/MiniGPT-4 d94738a: demo_v2.py, datasets/flickr.py, coco_dataset.py):
``<p>phrase</p> {<x1><y1><x2><y2>}``, corners in 0–100 bins, ``<delim>`` between boxes of one phrase, a bare
``{<..>}`` for ``[refer]``.
"""

from __future__ import annotations

import pytest

from bot.core.commands import ParsedMessage as Command
from bot.core.commands import parse_message
from bot.core.config import PresetSettings
from bot.core.errors import UserInputError
from bot.core.grounding import Box, Phrase, bold_spans, identify_region, parse_grounding, settled
from bot.core.presets import PresetBook


def test_grounding_one_phrase() -> None:
    found = parse_grounding("<p>a red square</p> {<10><20><40><60>}")
    assert found.phrases == (Phrase("a red square", (Box(10, 20, 40, 60),)),)
    assert found.text == "**a red square**"


def test_grounding_several_phrases_in_a_description() -> None:
    answer = (
        "A kitchen with <p>a wooden table</p> {<5><50><70><95>} and <p>two chairs</p> {<0><40><20><90>}. "
        "On <p>the wooden table</p> {<30><45><40><55>} stands <p>a vase</p>{<31><30><39><46>}, next to "
        "<p>two chairs</p> {<80><40><99><90>}."
    )
    found = parse_grounding(answer)
    assert [p.label for p in found.phrases] == ["a wooden table", "two chairs", "the wooden table", "a vase"]
    assert found.phrases[1].boxes == (Box(0, 40, 20, 90), Box(80, 40, 99, 90))  # one phrase, one colour
    assert found.text == (
        "A kitchen with **a wooden table** and **two chairs**. On **the wooden table** stands **a vase**, next "
        "to **two chairs**."
    )
    assert found.box_count == 5


@pytest.mark.parametrize(
    "answer",
    [
        "<p>sofas</p> {<1><2><30><40>}<delim>{<50><60><70><80>}",  # what the demo's cleaner removes
        "<p>sofas</p> {<1><2><30><40><delim><50><60><70><80>}",  # the notes' "inside the braces"
        "<p>sofas</p> {<1><2><30><40>} <delim> {<50><60><70><80>}",
    ],
)
def test_grounding_delim_groups_are_one_phrase(answer: str) -> None:
    found = parse_grounding(answer)
    assert found.phrases == (Phrase("sofas", (Box(1, 2, 30, 40), Box(50, 60, 70, 80))),)
    assert found.text == "**sofas**" and "<delim>" not in found.text


def test_grounding_bare_refer_box() -> None:
    found = parse_grounding("{<12><30><56><88>}")
    assert found.phrases == (Phrase("", (Box(12, 30, 56, 88),)),) and found.text == ""
    found = parse_grounding("It is here: {<12><30><56><88>}.")
    assert found.phrases == (Phrase("", (Box(12, 30, 56, 88),)),) and found.text == "It is here:."


def test_grounding_four_numbers_in_prose_are_no_box() -> None:
    """The demo draws any answer with exactly four integers as a [refer] box; here a box must look like one."""
    found = parse_grounding("There are 3 cats, 2 dogs, 1 bird and 5 fish.")
    assert found.phrases == () and found.text == "There are 3 cats, 2 dogs, 1 bird and 5 fish."


@pytest.mark.parametrize(
    "answer, text",
    [
        ("<p>a cat</p> {<1><2><3>}", "**a cat**"),  # three corners
        ("<p>a cat</p> {<1><2><3><4><5>}", "**a cat**"),  # five
        ("<p>a cat</p> {}", "**a cat**"),
        ("<p>a cat</p> {<50><20><40><60>}", "**a cat**"),  # right of the left edge? no
        ("<p>a cat</p> {<10><60><40><20>}", "**a cat**"),  # bottom above the top
        ("<p>a cat</p> {<10><20><40><6", "**a cat**"),  # cut off by the answer length limit
        ("a cat </p> sits <p> on {<delim>} a", "a cat sits on a"),
        ("<p>a cat</p", "a cat</p"),  # a stray <p> goes; "</p" is no tag
        ("", ""),
    ],
)
def test_grounding_malformed_input_is_ignored(answer: str, text: str) -> None:
    found = parse_grounding(answer)
    assert found.phrases == () and found.text == text


@pytest.mark.parametrize("box", ["{<-5><20><40><60>}", "{<10><20><140><60>}", "{<10><101><40><60>}"])
def test_grounding_coordinates_out_of_range_are_ignored(box: str) -> None:
    found = parse_grounding(f"<p>a cat</p> {box} and <p>a dog</p> {{<50><50><60><60>}}")
    assert found.phrases == (Phrase("a dog", (Box(50, 50, 60, 60),)),)
    assert found.text == "**a cat** and **a dog**"
    assert parse_grounding(f"<p>sofas</p> {box}<delim>{{<1><2><3><4>}}").phrases == (
        Phrase("sofas", (Box(1, 2, 3, 4),)),
    )  # the good box of a group is kept


def test_grounding_phrase_with_markup_characters() -> None:
    """The label keeps the phrase as written (drawn as pixels); the bold text loses only what would break the
    bold (``*``, backquotes); ``<``, ``&`` and ``@`` stay for each front end's own escaping."""
    found = parse_grounding("<p>the **<b>sign</b>** & `code` @here</p> {<10><20><40><60>}")
    assert found.phrases[0].label == "the **<b>sign</b>** & `code` @here"
    assert found.text == "**the <b>sign</b> & code @here**"
    assert parse_grounding("<p>*</p> {<10><20><40><60>}").text == "*"  # nothing left to make bold


def test_grounding_the_identify_region_is_the_reference_box() -> None:
    """The demo's ``mask2bbox``: the mask at 100×100, the first and last marked column and row."""
    assert identify_region("4 50 31 66") == "{<4><50><30><65>}"  # the demo's example box
    assert identify_region("0 0 100 100") == "{<0><0><99><99>}"
    assert identify_region("10.5, 20%, 60.2, 80") == "{<10><20><60><79>}"


@pytest.mark.parametrize(
    "words, says",
    [
        ("10 20 60", "four percentages"),
        ("a b c d", "four percentages"),
        ("10 20 160 80", "got 160"),
        ("-1 20 60 80", "got -1"),
        ("60 20 10 80", "right edge after the left"),
        ("10 80 60 80", "right edge after the left"),
    ],
)
def test_grounding_bad_region_is_a_clear_message(words: str, says: str) -> None:
    with pytest.raises(UserInputError) as error:
        identify_region(words)
    assert says in error.value.user_message and "identify 10 20 60 80" in error.value.user_message


def test_grounding_task_presets_only_with_minigptv2() -> None:
    v2, v1 = PresetBook(PresetSettings(), "minigptv2"), PresetBook(PresetSettings(), "vicuna0")
    assert {"grounding", "refer", "detection", "identify", "vqa", "caption"} <= set(v2.names)
    assert not {"grounding", "refer", "detection", "identify", "vqa", "caption"} & set(v1.names)
    assert v2.names[: len(v1.names)] == v1.names  # the configured presets first, as before

    def asked(text: str) -> str:
        return v2.question(parse_message(text, v2.names), True, "T", "C")

    assert asked("grounding") == "[grounding] describe this image in detail"
    assert asked("/refer the world cup") == "[refer] the world cup"
    assert asked("/detection sofas") == "[detection] sofas"
    assert asked("identify 4 50 31 66") == "[identify] what is this {<4><50><30><65>}"  # no slash needed
    assert asked("/identify 4 50 31 66") == "[identify] what is this {<4><50><30><65>}"
    assert asked("/vqa where should I hide") == "[vqa] where should I hide"
    assert asked("caption") == "[caption] please describe this image?"
    assert asked("identify the cat") == "identify the cat"  # a sentence: asked as written
    assert v2.question(Command(preset="identify", question="4 50 31 66"), True, "T", "C").endswith("{<4><50><30><65>}")
    for bare in ("refer", "detection", "identify", "/vqa"):
        with pytest.raises(UserInputError):
            asked(bare)
    assert parse_message("identify 4 50 31 66", v1.names) == Command(question="identify 4 50 31 66")


def test_grounding_configured_prompt_of_a_task_name_wins() -> None:
    settings = PresetSettings(prompts={"describe": "Describe it.", "refer": "Where is it?"})
    book = PresetBook(settings, "minigptv2")
    assert book.names.count("refer") == 1 and book.prompt("refer") == "Where is it?"
    assert book.question(Command(preset="refer"), True, "T", "C") == "Where is it?"


def test_grounding_cleaning_changes_only_the_spaces_next_to_a_token() -> None:
    """Code and prose away from the boxes keep their spacing (an indented line, "what ?"), so the text before
    an answer's first token is the cleaned text's start: what a stream that cannot take text back relies on."""
    answer = "what ?\n    indented  twice\nsee {<1><2><3><4>} here, <p>a cat</p> {<5><6><7><8>} . x{<1><1><2><2>}y"
    assert parse_grounding(answer).text == "what ?\n    indented  twice\nsee here, **a cat**. xy"


def test_grounding_bold_spans_outside_code() -> None:
    text = "A **cat** and `**x**` and\n```\n**y**\n```\n**z w** ** no ** **"
    assert bold_spans(text) == [
        ("A ", False), ("cat", True), (" and `**x**` and\n```\n**y**\n```\n", False), ("z w", True),
        (" ** no ** **", False),
    ]  # fmt: skip
    assert bold_spans("") == [] and bold_spans("plain") == [("plain", False)]


@pytest.mark.parametrize(
    "streamed, ready",
    [
        ("There is <p>a red", "There is"),
        ("There is <", "There is"),  # may become <p>
        ("There is </", "There is"),
        ("It is here {<1", "It is here"),
        ("It is here {", "It is here"),  # a box, or the start of one cut off
        ("a <de", "a"),
        ("a <b>bold</b> {x}  ", "a <b>bold</b> {x}"),  # no token: all but the spaces a token could take
        ("", ""),
    ],
)
def test_grounding_settled_is_what_cleaning_leaves_as_it_is(streamed: str, ready: str) -> None:
    assert streamed[: settled(streamed)] == ready
    for rest in ("", "<p>a cat</p> {<1><2><3><4>}.", " more <p>x</p>{<5><5><9><9>}"):
        assert parse_grounding(streamed + rest).text.startswith(ready)
