"""Slack's text rules: escaping, mention stripping, and splitting by escaped length (the splitter itself is
tested platform-neutrally in ``tests/adapters/test_streaming.py``)."""

from __future__ import annotations

from adapters.slack.messages import (
    escape_mrkdwn,
    escaped_len,
    missing_files_write,
    slack_format,
    strip_mention,
    to_mrkdwn,
    unescape_mrkdwn,
)
from adapters.streaming import split_message
from bot.core.grounding import GroundedPictures
from bot.core.requests import ReplyFile


def test_escaping_round_trips_and_counts():
    text = "a <b> & <@U123> <!here>"
    escaped = escape_mrkdwn(text)
    assert escaped == "a &lt;b&gt; &amp; &lt;@U123&gt; &lt;!here&gt;"
    assert unescape_mrkdwn(escaped) == text and escaped_len(text) == len(escaped)


def test_strip_mention_removes_only_this_bot():
    assert strip_mention("<@UBOT> what is &lt;this&gt;?", "UBOT") == "what is <this>?"
    assert strip_mention("hey <@UBOT|minigpt4>: recipe  please", "UBOT") == "hey recipe please"
    assert strip_mention("ask <@UOTHER> too", "UBOT") == "ask <@UOTHER> too"
    assert strip_mention("line one\nline two", None) == "line one\nline two"


def test_limit_counts_escaped_characters():
    text = "<>&" * 100
    chunks = split_message(text, 100, escaped_len)
    assert all(escaped_len(c) <= 100 for c in chunks)
    assert "".join(chunks) == text
    fmt = slack_format(3500)
    assert fmt.cost is escaped_len and fmt.escape is to_mrkdwn and fmt.limit == 3500


def test_hard_cuts_count_escapes_and_keep_clusters():
    clusters = ["👩\u200d💻", "e\u0301", "🇩🇪", "&", "<", "漢"]
    text = "".join(clusters[i % len(clusters)] for i in range(400))
    chunks = split_message(text, 64, escaped_len)
    assert len(chunks) > 5 and "".join(chunks) == text
    assert all(len(escape_mrkdwn(c)) <= 64 for c in chunks)


def test_markdown_bold_becomes_slack_bold_escaped_and_never_in_code():
    """Issue 24: the core marks an answer's boxed phrases ``**phrase**``; Slack's mrkdwn bold is ``*phrase*``.
    Markup in a phrase stays escaped text; code (fenced or inline) keeps its asterisks."""
    text = "There is **a <b>red</b> square** & **the floor**: `a**b**c`\n```\nx = 2**k**2\n```\n** not bold **"
    assert to_mrkdwn(text) == (
        "There is *a &lt;b&gt;red&lt;/b&gt; square* &amp; *the floor*: `a**b**c`\n```\nx = 2**k**2\n```\n** not bold **"
    )
    assert all(len(to_mrkdwn(c)) <= 64 for c in split_message(text * 20, 64, escaped_len))  # fits as counted


def test_missing_files_write_names_what_could_not_be_attached():
    """Issue 24: the note names the boxes picture as such, not "the preview and the page file"."""
    boxes = ReplyFile(GroundedPictures.FILENAME, "image/png", b"png", title=GroundedPictures.TITLE)
    note = missing_files_write([boxes])
    assert note.startswith("I couldn't attach “The boxes on your picture” (boxes.png): ")
    assert "files:write" in note and "preview" not in note and "page" not in note
    page = [ReplyFile("website.png", "image/png", b"", title="Preview"), ReplyFile("website.html", "text/html", b"")]
    assert missing_files_write(page).startswith("I couldn't attach “Preview” (website.png) and website.html: ")
