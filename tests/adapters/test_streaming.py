"""The platform-neutral streaming helpers: the splitter, the edit budget and the stream→edits state machine.

:class:`MemoryMessages` is an in-memory :class:`~adapters.streaming.EditableMessages` (what a front end
supplies), so the state machine is tested here without any platform; the Slack tests run it against the
fake Slack as well.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.streaming import (
    INTERRUPTED,
    PLACEHOLDER,
    SUFFIX,
    EditableMessages,
    ReplyFormat,
    StreamedReply,
    TokenBucket,
    split_message,
)
from bot.core.requests import Delta, Final, ReplyFile
from tests.replies import endless_answer

# ---------------------------------------------------------------------- split_message


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


def test_the_limit_counts_what_cost_says():
    def cost(text: str) -> int:  # a platform where "#" renders as three characters
        return len(text) + 2 * text.count("#")

    text = "#ab" * 100
    chunks = split_message(text, 100, cost)
    assert all(cost(c) <= 100 for c in chunks) and max(cost(c) for c in chunks) >= 95
    assert "".join(chunks) == text
    assert all(len(c) <= 100 for c in split_message(text, 100))  # plain len by default


def test_hard_cuts_never_split_characters_or_clusters():
    clusters = ["👩\u200d💻", "e\u0301", "🇩🇪", "👍🏽", "漢", "ü", "❤\ufe0f"]
    text = "".join(clusters[i % len(clusters)] for i in range(400))  # no spaces: only hard cuts
    chunks = split_message(text, 64)
    assert len(chunks) > 5 and "".join(chunks) == text
    for chunk in chunks:
        assert len(chunk) <= 64
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


def test_the_same_splitter_serves_a_2000_character_limit_with_len():
    """Discord's limit: 2,000 characters, no escaping — every chunk full-ish, fences and clusters intact."""
    code = "\n".join(f"x_{i} = '漢字 👩‍💻 e\u0301 <b>&</b>'" for i in range(120))
    prose = "Ein Satz mit Umlauten: größer, schöner. 🇩🇪🇫🇷 " * 60
    text = prose + "\n\n```python\n" + code + "\n```\n\n" + prose
    chunks = split_message(text, 2000, len)
    assert len(chunks) >= 4
    for chunk in chunks:
        assert len(chunk) <= 2000 and chunk.count("```") % 2 == 0
        chunk.encode("utf-8")
        assert (chunk.count("🇩") + chunk.count("🇪") + chunk.count("🇫") + chunk.count("🇷")) % 2 == 0
    assert all(len(c) > 1000 for c in chunks[:-1])  # cut late, not every few lines
    assert "<b>&</b>" in chunks[1]  # nothing escaped
    code_chunks = [c for c in chunks if "x_" in c]
    assert all(c.startswith("```python\n") for c in code_chunks[1:])
    joined = "".join(chunks)
    for cluster in ("👩‍💻", "e\u0301", "🇩🇪", "🇫🇷"):
        assert joined.count(cluster) == text.count(cluster)
    code_lines = [line for c in chunks for line in c.split("\n") if line.startswith("x_")]
    assert code_lines == code.split("\n")


# ---------------------------------------------------------------------- TokenBucket


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


# ---------------------------------------------------------------------- StreamedReply


class MemoryMessages:
    """Messages in memory, every call logged; ``refuse`` makes the next calls of a kind fail."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}  # id -> current text (deleted ones removed)
        self.versions: dict[str, list[str]] = {}
        self.ephemerals: list[str] = []
        self.calls: list[str] = []
        self.refuse: set[str] = set()
        self.uploaded: list[Any] = []
        self.upload_note: str | None = None  # what upload() answers: None = done, else a note for the asker
        self._ids = itertools.count(1)

    async def post(self, text: str) -> str | None:
        self.calls.append("post")
        if "post" in self.refuse:
            return None
        message_id = f"m{next(self._ids)}"
        self.texts[message_id], self.versions[message_id] = text, [text]
        return message_id

    async def update(self, message_id: str, text: str) -> bool:
        self.calls.append("update")
        if "update" in self.refuse or message_id not in self.texts:
            return False
        self.texts[message_id] = text
        self.versions[message_id].append(text)
        return True

    async def delete(self, message_id: str) -> bool:
        self.calls.append("delete")
        return self.texts.pop(message_id, None) is not None

    async def post_ephemeral(self, text: str) -> bool:
        self.calls.append("post_ephemeral")
        self.ephemerals.append(text)
        return True

    async def upload(self, files: Any) -> str | None:
        self.calls.append("upload")
        self.uploaded.extend(files)
        return self.upload_note

    def shown(self) -> list[str]:
        return list(self.texts.values())


def _reply(messages: MemoryMessages, **fmt: Any) -> StreamedReply:
    return StreamedReply(messages, TokenBucket(600), ReplyFormat(**({"limit": 100} | fmt)), interval_s=0)


async def _events(*events: Any, pause: float = 0.0) -> AsyncIterator[Any]:
    for event in events:
        if pause:
            await asyncio.sleep(pause)
        yield event


def test_memory_messages_is_editable_messages():
    assert isinstance(MemoryMessages(), EditableMessages)


def test_a_streamed_answer_grows_in_place_and_long_ones_continue_in_new_messages():
    async def main() -> None:
        messages = MemoryMessages()
        words = [Delta(f"word{i} ") for i in range(60)]
        final = Final("".join(d.text for d in words).strip())
        await _reply(messages).run(_events(*words, final, pause=0.01))
        shown = messages.shown()
        assert len(shown) >= 4 and all(len(text) <= 100 for text in shown)
        assert " ".join(shown).split() == final.text.split()
        first = messages.versions["m1"]
        assert first[0] == PLACEHOLDER and any(v.endswith(SUFFIX) for v in first[1:-1])
        assert "delete" not in messages.calls  # messages were only added

    asyncio.run(main())


def test_files_follow_the_final_text_and_a_refusal_is_said_in_place():
    async def main() -> None:
        files = (ReplyFile("website.png", "image/png", b"png"), ReplyFile("website.html", "text/html", b"<html>"))
        messages = MemoryMessages()
        await _reply(messages).run(_events(Delta("Here "), Final("Here it is.", files=files), pause=0.01))
        assert messages.uploaded == list(files) and messages.calls[-1] == "upload"
        assert messages.shown() == ["Here it is."]

        refused = MemoryMessages()
        refused.upload_note = "I lack the permission to attach files."
        await _reply(refused, escape=str.upper).run(_events(Final("Here it is.", files=files)))
        assert refused.shown() == ["HERE IT IS.", "I LACK THE PERMISSION TO ATTACH FILES."]  # escaped, after the text

        plain = MemoryMessages()
        await _reply(plain).run(_events(Final("No page here.")))
        assert "upload" not in plain.calls

    asyncio.run(main())


def test_a_quick_notice_shows_no_placeholder_and_goes_to_the_asker_alone():
    async def main() -> None:
        messages = MemoryMessages()
        await _reply(messages, escape=str.upper).run(_events(Final("limit reached", kind="notice", ephemeral=True)))
        assert messages.calls == ["post_ephemeral"] and messages.ephemerals == ["LIMIT REACHED"]

    asyncio.run(main())


def test_a_slow_redelivery_removes_its_placeholder():
    async def main() -> None:
        messages = MemoryMessages()

        async def slow_nothing() -> AsyncIterator[Any]:
            await asyncio.sleep(0.5)
            return
            yield

        await _reply(messages).run(slow_nothing())
        assert messages.calls == ["post", "delete"] and messages.shown() == []

    asyncio.run(main())


def test_errors_get_the_platform_warning_and_an_empty_answer_a_word():
    async def main() -> None:
        messages = MemoryMessages()
        await _reply(messages, warning="(!) ").run(_events(Delta("partial"), Final("It broke.", kind="error")))
        assert messages.shown() == ["(!) It broke."]
        messages = MemoryMessages()
        await _reply(messages).run(_events(Final("   ")))
        assert messages.shown() == ["(no answer)"]

    asyncio.run(main())


def test_cancelled_mid_answer_says_so_and_closes_the_core_iterator():
    async def main() -> None:
        messages = MemoryMessages()
        closed = asyncio.Event()
        reply = _reply(messages)
        task = asyncio.create_task(reply.run(endless_answer(closed)))
        while messages.texts.get("m1") != "so far" + SUFFIX:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert closed.is_set() and messages.texts["m1"] == INTERRUPTED

    asyncio.run(main())


def test_a_vanished_message_is_replaced_by_a_new_one():
    async def main() -> None:
        messages = MemoryMessages()

        async def answer() -> AsyncIterator[Any]:
            yield Delta("Hello")
            while "update" not in messages.calls:
                await asyncio.sleep(0.01)
            del messages.texts["m1"]  # someone deleted it
            yield Final("Hello there.")

        await _reply(messages).run(answer())
        assert messages.shown() == ["Hello there."] and "m2" in messages.texts

    asyncio.run(main())


def test_interim_edits_wait_for_the_interval_and_the_budget():
    async def main() -> None:
        t = FakeTime()
        messages = MemoryMessages()
        stamps: list[float] = []
        update = messages.update

        async def timed_update(message_id: str, text: str) -> bool:
            stamps.append(t.now)
            return await update(message_id, text)

        messages.update = timed_update  # type: ignore[method-assign]
        bucket = TokenBucket(6, burst=1, clock=t.clock, sleep=t.sleep)
        reply = StreamedReply(messages, bucket, ReplyFormat(limit=200), interval_s=15.0, clock=t.clock, sleep=t.sleep)

        async def stream() -> AsyncIterator[Any]:
            for i in range(40):
                await t.sleep(1.0)
                yield Delta(f"{i} ")
            yield Final("done")

        await reply.run(stream())
        versions = messages.versions["m1"]
        assert versions[0] == PLACEHOLDER and versions[-1] == "done" and len(versions) >= 4
        interim = stamps[:-1]
        assert all(b - a >= 15.0 for a, b in itertools.pairwise(interim))  # this answer's interval
        assert max(sum(s <= u < s + 60 for u in stamps) for s in stamps) <= 6  # the shared budget

    asyncio.run(main())
