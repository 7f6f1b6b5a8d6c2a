"""Streaming into Slack: long answers split into several messages, the per-workspace chat.update budget,
and the streamed reply's edge cases on Slack (slow redelivery, interruption, errors, vanished placeholder)."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fake_slack import FakeSlack
from slack_helpers import CHANNEL, Env, ScriptedBackend, in_slack, png_bytes

from adapters.slack.app import make_client
from adapters.slack.messages import INTERRUPTED, PLACEHOLDER, SlackThread, slack_format, unescape_mrkdwn
from adapters.streaming import StreamedReply, TokenBucket
from bot.core.requests import Delta, Final
from tests.replies import endless_answer

CODE = "\n".join(f"print('línea {i}: 漢字 👩‍💻 e\u0301 <b>&amp;</b>')" for i in range(30))
LONG = (
    "Here is the plan — größer als erwartet. " * 12
    + "\n\n```python\n"
    + CODE
    + "\n```\n\n"
    + "Fertig! 🇩🇪🇫🇷 ça va? " * 40
)


def _plain(text: str) -> str:
    """Text without fence markers or whitespace: what must survive splitting unchanged."""
    return re.sub(r"\s+", "", re.sub(r"```(python)?", "", text))


def test_long_answer_is_split_without_breaking_characters_or_code_fences(tmp_path: Path) -> None:
    slack = {"max_message_chars": 300}

    async def main(env: Env, fake: FakeSlack) -> None:
        mention = fake.mention(CHANNEL, "website", files=[fake.add_file(png_bytes())])
        await fake.send_event(mention)
        await fake.wait_for(lambda: env.outcomes().get("answered"))
        await fake.settle(0.3)
        turns = await env.turns(mention["ts"])
        assert turns[1].text == LONG.strip()
        replies = fake.bot_replies(CHANNEL, mention["ts"])
        assert len(replies) >= 5 and all(m.thread_ts == mention["ts"] for m in replies)
        for message in replies:
            for _, version in message.edits:  # interim versions too
                assert len(version) <= 300 and version.count("```") % 2 == 0, version
                version.encode("utf-8")
        shown = [unescape_mrkdwn(m.text) for m in replies]
        joined = "".join(shown)
        assert _plain(joined) == _plain(LONG)
        for cluster in ("👩‍💻", "e\u0301", "🇩🇪", "🇫🇷", "漢字", "<b>&amp;</b>"):
            assert joined.count(cluster) == LONG.count(cluster), cluster
        code_parts = [s for s in shown if "print(" in s]
        assert len(code_parts) >= 3 and all(s.count("```") == 2 for s in code_parts[1:-1])
        assert all(s.startswith("```python\n") for s in code_parts[1:])  # reopened with its language
        assert not any(m.deleted for m in fake.thread(CHANNEL, mention["ts"], deleted=True))

    in_slack(main, tmp_path, backend=ScriptedBackend(LONG, piece=9), slack=slack)


def test_update_budget_is_shared_by_concurrent_streams(tmp_path: Path) -> None:
    scale = 60.0  # one real second is one minute of the adapter's (and the fake's) clock

    def clock() -> float:
        return time.monotonic() * scale

    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds / scale)

    backend = ScriptedBackend("word " * 160, piece=5, delay=0.012)  # ≈ 1.9 s = 2 minutes of clock
    slack = {"updates_per_minute": 8, "update_interval_s": 5.0}

    async def main(env: Env, fake: FakeSlack) -> None:
        mentions = [fake.mention(CHANNEL, f"question {i}", files=[fake.add_file(png_bytes())]) for i in range(2)]
        await asyncio.gather(*(fake.send_event(m) for m in mentions))
        for mention in mentions:
            await env.answered(mention["ts"])
        updates = sorted(c.at for c in fake.calls_of("chat.update"))
        tolerance = 3.0  # 50 ms of real time for the trip to the fake
        worst = max(sum(t <= u < t + 60.0 - tolerance for u in updates) for t in updates)
        assert worst <= 8, updates
        assert len(updates) >= 10  # both streams were edited while they ran, within the budget
        for mention in mentions:
            (message,) = fake.bot_replies(CHANNEL, mention["ts"])
            interim = [t for t, text in message.edits[1:-1]]
            assert all(b - a >= 5.0 - tolerance for a, b in itertools.pairwise(interim))
            assert message.text == ("word " * 160).strip()

    in_slack(main, tmp_path, backend=backend, slack=slack, clock=clock, sleep=sleep)


async def _reply(fake: FakeSlack) -> tuple[StreamedReply, str]:
    client = make_client(fake.bot_token, fake.api_url)
    thread = fake.user_message(CHANNEL, "question")["ts"]
    messages = SlackThread(client, CHANNEL, thread, "UALICE", False)
    return StreamedReply(messages, TokenBucket(600), slack_format(300), interval_s=0), thread


def test_thread_reply_edge_cases() -> None:
    async def main() -> None:
        fake = await FakeSlack().start()
        try:
            # The core took a while, then answered nothing (a redelivery): the placeholder goes away.
            async def slow_nothing() -> AsyncIterator[Any]:
                await asyncio.sleep(0.5)
                return
                yield

            reply, thread = await _reply(fake)
            await reply.run(slow_nothing())
            assert [c.method for c in fake.calls] == ["chat.postMessage", "chat.delete"]
            assert not fake.bot_replies(CHANNEL, thread)

            # An error after some text: the warning replaces the partial answer.
            async def failing() -> AsyncIterator[Any]:
                yield Delta("partial answ")
                await asyncio.sleep(0.4)
                yield Final("Sorry, something went wrong.", kind="error")

            reply, thread = await _reply(fake)
            await reply.run(failing())
            (message,) = fake.bot_replies(CHANNEL, thread)
            assert [v for _, v in message.edits] == [
                PLACEHOLDER,
                "partial answ …",
                ":warning: Sorry, something went wrong.",
            ]

            # Shutdown mid-answer: the placeholder says so and the core's iterator is closed.
            closed = asyncio.Event()
            reply, thread = await _reply(fake)
            task = asyncio.create_task(reply.run(endless_answer(closed)))
            ids = reply.message_ids
            await fake.wait_for(lambda: ids and fake.find(CHANNEL, ids[0]).text == "so far …")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert closed.is_set() and fake.find(CHANNEL, reply.message_ids[0]).text == INTERRUPTED

            # Someone deleted the placeholder: the answer arrives in a new message.
            async def answer_after_delete() -> AsyncIterator[Any]:
                yield Delta("Hello")
                await fake.wait_for(lambda: len(fake.calls_of("chat.update")) > calls)
                fake.find(CHANNEL, reply.message_ids[0]).deleted = True
                yield Final("Hello there.")

            calls = len(fake.calls_of("chat.update"))
            reply, thread = await _reply(fake)
            await reply.run(answer_after_delete())
            assert [m.text for m in fake.bot_replies(CHANNEL, thread)] == ["Hello there."]
        finally:
            await fake.close()

    asyncio.run(main())
