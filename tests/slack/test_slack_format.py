"""Unit tests of the Slack rendering helpers: escaping, mention stripping, the splitter and the edit budget."""

from __future__ import annotations

import asyncio

import pytest

from adapters.slack_format import (
    TokenBucket,
    escape_mrkdwn,
    escaped_len,
    split_message,
    strip_mention,
    unescape_mrkdwn,
)


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


def test_short_text_is_one_chunk_and_empty_is_none():
    assert split_message("  hello\n", 100) == ["hello"]
    assert split_message("", 100) == [] and split_message(" \n ", 100) == []
    with pytest.raises(ValueError):
        split_message("x", 10)


def test_splits_prefer_paragraphs_then_lines_then_sentences_then_words():
    para = "A" * 50 + "\n\n" + "B" * 50
    assert split_message(para, 80) == ["A" * 50, "B" * 50]
    lines = "x" * 40 + "\n" + "y" * 40 + "\n" + "z" * 40
    assert split_message(lines, 90) == ["x" * 40 + "\n" + "y" * 40, "z" * 40]
    sentences = "One two three. " * 10
    chunks = split_message(sentences, 70)
    assert all(c.endswith(".") for c in chunks) and "".join(c + " " for c in chunks).strip() == sentences.strip()
    words = "word " * 40
    assert all(not c.startswith(" ") and not c.endswith(" ") for c in split_message(words, 64))


def test_limit_counts_escaped_characters():
    text = "<>&" * 100
    chunks = split_message(text, 100)
    assert all(escaped_len(c) <= 100 for c in chunks)
    assert "".join(chunks) == text


def test_hard_cuts_never_split_characters_or_clusters():
    clusters = ["👩\u200d💻", "e\u0301", "🇩🇪", "👍🏽", "漢", "ü", "❤\ufe0f"]
    text = "".join(clusters[i % len(clusters)] for i in range(400))  # no spaces: only hard cuts
    chunks = split_message(text, 64)
    assert len(chunks) > 5 and "".join(chunks) == text
    for chunk in chunks:
        assert escaped_len(chunk) <= 64
        chunk.encode("utf-8")
        assert not chunk.startswith(("\u200d", "\u0301", "\ufe0f", "🏽")) and not chunk.endswith("\u200d")
        flags = chunk.count("🇩") + chunk.count("🇪")
        assert flags % 2 == 0  # regional indicators stay in pairs


def test_code_fences_are_closed_and_reopened_with_their_language():
    code = "\n".join(f"line_{i} = {i}  # ünïcode" for i in range(40))
    text = "Intro paragraph.\n\n```python\n" + code + "\n```\nOutro."
    chunks = split_message(text, 200)
    assert len(chunks) >= 4
    for i, chunk in enumerate(chunks):
        assert chunk.count("```") % 2 == 0, chunk
        assert len(chunk) <= 200
        if 0 < i < len(chunks) and "line_" in chunk.split("\n", 1)[0 if i == 0 else 1]:
            assert chunk.startswith("```python\n") or chunk.startswith("Intro")
    body = [line for c in chunks for line in c.split("\n") if line.startswith("line_")]
    assert body == code.split("\n")  # every code line intact, in order
    assert chunks[-1].endswith("```\nOutro.")


def test_inline_triple_backticks_do_not_toggle_fences():
    text = ("Use ```inline``` here. " * 30).strip()
    assert all(c.count("```") % 2 == 0 for c in split_message(text, 100))


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def test_bucket_allows_burst_then_refills_and_caps_every_minute():
    t = FakeTime()
    bucket = TokenBucket(45, burst=3, clock=t.clock, sleep=t.sleep)
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]
    t.now += 60 / 42  # one refill
    assert bucket.try_acquire() and not bucket.try_acquire()
    taken = []
    for _ in range(2000):  # try every 0.1 s for 200 s
        t.now += 0.1
        if bucket.try_acquire():
            taken.append(t.now)
    assert max(sum(s <= u < s + 60 for u in taken) for s in taken) <= 45
    assert len(taken) >= 130  # and the budget is used, about 42 a minute


def test_waiters_get_tokens_before_try_acquire_and_within_the_cap():
    async def main() -> None:
        t = FakeTime()
        bucket = TokenBucket(6, burst=2, clock=t.clock, sleep=t.sleep)
        stamps: list[float] = []

        async def final() -> None:
            await bucket.acquire()
            stamps.append(t.now)

        waiters = [asyncio.create_task(final()) for _ in range(12)]
        await asyncio.sleep(0)
        assert not bucket.try_acquire()  # waiters go first
        await asyncio.gather(*waiters)
        assert len(stamps) == 12
        assert max(sum(s <= u < s + 60 for u in stamps) for s in stamps) <= 6
        assert stamps[-1] - stamps[0] < 151  # 2 at once, then one every 15 s

    asyncio.run(main())


def test_a_budget_of_one_per_minute_still_works():
    t = FakeTime()
    bucket = TokenBucket(1, clock=t.clock, sleep=t.sleep)
    assert bucket.try_acquire() and not bucket.try_acquire()
    t.now += 59.9
    assert not bucket.try_acquire()
    t.now += 0.2
    assert bucket.try_acquire()
    with pytest.raises(ValueError):
        TokenBucket(0)
