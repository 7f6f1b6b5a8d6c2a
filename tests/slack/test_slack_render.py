"""Slack's text rules: escaping, mention stripping, and splitting by escaped length (the splitter itself is
tested platform-neutrally in ``tests/adapters/test_streaming.py``)."""

from __future__ import annotations

from adapters.slack.render import escape_mrkdwn, escaped_len, slack_format, strip_mention, unescape_mrkdwn
from adapters.streaming import split_message


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
    assert fmt.cost is escaped_len and fmt.escape is escape_mrkdwn and fmt.limit == 3500


def test_hard_cuts_count_escapes_and_keep_clusters():
    clusters = ["👩\u200d💻", "e\u0301", "🇩🇪", "&", "<", "漢"]
    text = "".join(clusters[i % len(clusters)] for i in range(400))
    chunks = split_message(text, 64, escaped_len)
    assert len(chunks) > 5 and "".join(chunks) == text
    assert all(len(escape_mrkdwn(c)) <= 64 for c in chunks)
