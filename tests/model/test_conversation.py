"""Prompt templates, byte-exact with the reference ``Conversation.get_prompt`` (``SeparatorStyle.SINGLE``).

Expected strings are written out by hand from the reference rules: ``system + sep``, then
``role + message + sep`` per finished message and a bare ``role`` for the open assistant slot;
an image is the message ``<Img><ImageHere></Img>`` and ``Chat.ask`` joins the question to it
with one space.
"""

from __future__ import annotations

import pytest

from model import TEMPLATES, ChatTurn, build_prompt, clean_answer

SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it "
    "to you. Please answer my questions."
)
IMG = "<Img><ImageHere></Img>"

SINGLE = [{"role": "user", "text": "What is this?", "image": True}]
MULTI = [
    {"role": "user", "text": "Describe this image.", "image": True},
    {"role": "assistant", "text": "A cat on a mat."},
    {"role": "user", "text": "What colour is the cat?"},
    {"role": "assistant", "text": "Black."},
    {"role": "user", "text": "And this one?", "image": True},
]


def test_vicuna0_single():
    assert build_prompt(TEMPLATES["vicuna0"], SINGLE) == (
        SYSTEM + "###" + "Human: " + IMG + " What is this?" + "###" + "Assistant: "
    )


def test_vicuna0_multi_turn():
    expected = (
        SYSTEM
        + "###"
        + "Human: <Img><ImageHere></Img> Describe this image.###"
        + "Assistant: A cat on a mat.###"
        + "Human: What colour is the cat?###"
        + "Assistant: Black.###"
        + "Human: <Img><ImageHere></Img> And this one?###"
        + "Assistant: "
    )
    assert build_prompt(TEMPLATES["vicuna0"], MULTI) == expected


def test_llama2_single():
    assert build_prompt(TEMPLATES["llama2"], SINGLE) == SYSTEM + "<s>[INST] " + IMG + " What is this?" + " [/INST] "


def test_llama2_multi_turn():
    expected = (
        SYSTEM
        + "<s>[INST] <Img><ImageHere></Img> Describe this image."
        + " [/INST] A cat on a mat."
        + "<s>[INST] What colour is the cat?"
        + " [/INST] Black."
        + "<s>[INST] <Img><ImageHere></Img> And this one?"
        + " [/INST] "
    )
    assert build_prompt(TEMPLATES["llama2"], MULTI) == expected


def test_minigptv2_single_vqa():
    turns = [{"role": "user", "text": "[vqa] What is this?", "image": True}]
    assert build_prompt(TEMPLATES["minigptv2"], turns) == "<s>[INST] <Img><ImageHere></Img> [vqa] What is this? [/INST]"


def test_minigptv2_multi_turn():
    expected = (
        "<s>[INST] <Img><ImageHere></Img> Describe this image."
        + " [/INST]A cat on a mat."
        + "<s>[INST] What colour is the cat?"
        + " [/INST]Black."
        + "<s>[INST] <Img><ImageHere></Img> And this one?"
        + " [/INST]"
    )
    assert build_prompt(TEMPLATES["minigptv2"], MULTI) == expected


@pytest.mark.parametrize("variant", ["vicuna0", "llama2", "minigptv2"])
def test_image_without_question_is_bare_image_message(variant):
    t = TEMPLATES[variant]
    prompt = build_prompt(t, [{"role": "user", "image": True}])
    assert prompt == t.system + t.sep + t.roles[0] + IMG + t.sep + t.roles[1]


@pytest.mark.parametrize("variant", ["vicuna0", "llama2", "minigptv2"])
def test_open_assistant_turn_is_not_doubled(variant):
    t = TEMPLATES[variant]
    with_open = build_prompt(t, [*SINGLE, {"role": "assistant", "text": ""}])
    assert with_open == build_prompt(t, SINGLE)
    assert with_open.endswith(t.roles[1]) and with_open.count(t.roles[1]) == 1


def test_turn_objects_and_mappings_are_equivalent():
    as_turns = [
        ChatTurn(role="user", text="Describe this image.", image=True),
        ChatTurn(role="assistant", text="A cat on a mat."),
    ]
    as_dicts = [
        {"role": "user", "text": "Describe this image.", "image": True},
        {"role": "assistant", "text": "A cat on a mat."},
    ]
    assert build_prompt(TEMPLATES["vicuna0"], as_turns) == build_prompt(TEMPLATES["vicuna0"], as_dicts)


def test_image_then_separate_question_joins_like_chat_ask():
    """The reference ``Chat.upload_img`` appends the image message and ``Chat.ask`` then *joins* the next
    question to it (the last user message ends with ``</Img>``), so an image-only user turn followed by a
    text-only user turn gives the same prompt as one user turn carrying both (regression: it used to give
    two ``Human:`` messages)."""
    separate = [{"role": "user", "image": True}, {"role": "user", "text": "What is this?"}]
    assert build_prompt(TEMPLATES["vicuna0"], separate) == build_prompt(TEMPLATES["vicuna0"], SINGLE)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("role", ["system", "bot", "User", ""])
def test_invalid_role_raises(role):
    with pytest.raises(ValueError, match="role"):
        build_prompt(TEMPLATES["vicuna0"], [{"role": role, "text": "hi"}])


def test_assistant_image_raises():
    with pytest.raises(ValueError, match="assistant"):
        build_prompt(TEMPLATES["vicuna0"], [*SINGLE, {"role": "assistant", "text": "x", "image": True}])


@pytest.mark.parametrize("role", ["user", "assistant"])
def test_image_marker_in_text_raises(role):
    with pytest.raises(ValueError, match="<ImageHere>"):
        build_prompt(TEMPLATES["llama2"], [{"role": role, "text": "look <ImageHere> here"}])


# ----------------------------------------------------------------------------- clean_answer


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("A cat.###Human: more", "A cat."),
        ("  A cat.  ", "A cat."),
        ("Assistant: A cat.", "A cat."),
        ("junk Assistant: one Assistant: two###Human: x", "two"),
        ("###everything after is dropped", ""),
        ("line one\nline two\n", "line one\nline two"),
        ("no separators", "no separators"),
        ("Assistant:###", ""),
    ],
)
def test_clean_answer(raw, clean):
    assert clean_answer(raw) == clean


def test_clean_answer_cuts_before_splitting_on_assistant():
    # '###' is cut first, so an 'Assistant:' after it does not win
    assert clean_answer("keep###Assistant: drop") == "keep"
