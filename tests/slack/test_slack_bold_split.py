"""A long answer cut into several Slack messages never cuts a bold phrase (the cleaned grounding answer's
``**phrase**``, Slack's ``*phrase*``) inside its markers: each message shows its phrases bold, no stray
asterisks — checked on the splitter with Slack's cost and through :func:`to_mrkdwn`, as Slack gets them."""

from __future__ import annotations

import re

import pytest

from adapters.slack.messages import escaped_len, to_mrkdwn
from adapters.streaming import split_message

PHRASES = ["a red square", "the tall green tree", "a <small> & blue cup", "x"]


def answer(padding: int) -> str:
    """Words, then phrases at every offset the padding moves them to, as a cleaned grounding answer reads."""
    filler = "word " * padding
    return filler + " and ".join(f"**{p}** on the left" for p in PHRASES * 6) + "."


@pytest.mark.parametrize("limit", [64, 80, 101, 150])
def test_no_chunk_cuts_a_bold_phrase(limit: int) -> None:
    for padding in range(0, 40):
        text = answer(padding)
        chunks = split_message(text, limit, escaped_len)
        assert all(escaped_len(c) <= limit for c in chunks)
        for chunk in chunks:
            assert chunk.count("**") % 2 == 0, (padding, chunk)
            shown = to_mrkdwn(chunk)
            assert "**" not in shown and re.sub(r"\*[^*\n]+\*", "", shown).count("*") == 0, (padding, shown)
        bold = [p for c in chunks for p in re.findall(r"\*\*([^*]+)\*\*", c)]
        assert bold == re.findall(r"\*\*([^*]+)\*\*", text)  # every phrase whole, in order


def test_a_phrase_longer_than_a_message_is_still_cut() -> None:
    text = "**" + "long " * 40 + "phrase**"
    chunks = split_message(text, 64, escaped_len)
    assert len(chunks) > 1 and all(escaped_len(c) <= 64 for c in chunks)
    assert " ".join(chunks).replace("*", "").split() == text.replace("*", "").split()
