"""The Slack adapter over Socket Mode against the fake Slack: real bolt/sdk clients, real core, demo weights."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from slack_helpers import CHANNEL, Env, FakeSlack, ScriptedBackend, in_slack, png_bytes

from adapters.slack.messages import PLACEHOLDER, escape_mrkdwn


def test_mention_answers_in_thread_and_follow_ups_need_no_mention(demo_backend: Any, tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        mention = fake.mention(CHANNEL, "What is in this picture?", files=[fake.add_file(png_bytes())])
        envelope = await fake.send_event(mention)
        assert await fake.wait_ack(envelope) < 3.0
        root = mention["ts"]
        turns = await env.answered(root)
        assert [(t.role, t.status) for t in turns] == [("user", "done"), ("assistant", "done")]
        assert turns[0].text == "What is in this picture?" and turns[0].has_image
        assert fake.downloads and all(d["authorized"] for d in fake.downloads)

        (reply,) = fake.bot_replies(CHANNEL, root)
        assert reply.thread_ts == root  # threaded under the mention
        versions = [text for _, text in reply.edits]
        assert versions[0] == PLACEHOLDER and len(versions) >= 2
        assert versions[-1] == escape_mrkdwn(turns[1].text) != ""
        posts = fake.calls_of("chat.postMessage")
        assert [c.args["thread_ts"] for c in posts] == [root]

        # A reply in the thread, no mention: continues the same conversation.
        follow = fake.user_message(CHANNEL, "And what colour is it?", thread_ts=root)
        await fake.wait_ack(await fake.send_event(follow))
        turns = await env.answered(root, answers=2)
        assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
        assert turns[2].text == "And what colour is it?" and not turns[2].has_image
        replies = fake.bot_replies(CHANNEL, root)
        assert len(replies) == 2 and all(m.thread_ts == root for m in replies)

        # Chatter elsewhere (top level, a thread the bot is not in) is none of the bot's business.
        calls = len(fake.calls)
        other = fake.user_message(CHANNEL, "lunch?")
        await fake.send_event(other)
        await fake.send_event(fake.user_message(CHANNEL, "sure", thread_ts=other["ts"]))
        await fake.settle()
        assert [c.method for c in fake.calls[calls:]] == []
        assert set(fake.sent) <= set(fake.acks)  # every envelope acked, the bot's own echoes included

    in_slack(main, tmp_path, backend=demo_backend)


def test_direct_messages_need_no_mention(demo_backend: Any, tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        dm = fake.user_message("D0ALICE", "<@UBOT> describe", files=[fake.add_file(png_bytes((0, 90, 200)))])
        assert dm["channel_type"] == "im" and dm["subtype"] == "file_share"
        await fake.send_event(dm)
        await fake.send_event(dm | {"type": "app_mention"})  # should Slack also send one: not a second answer
        turns = await env.answered(dm["ts"], channel="D0ALICE")
        assert turns[0].text == "Describe this image in detail."  # the preset, mention stripped
        follow = fake.user_message("D0ALICE", "Is it dark?", thread_ts=dm["ts"])
        await fake.send_event(follow)
        turns = await env.answered(dm["ts"], answers=2, channel="D0ALICE")
        assert [t.text for t in turns if t.role == "user"] == ["Describe this image in detail.", "Is it dark?"]
        await fake.settle()
        replies = fake.bot_replies("D0ALICE", dm["ts"])
        assert len(replies) == 2 and all(m.thread_ts == dm["ts"] for m in replies)
        assert env.outcomes() == {"answered": 2.0}

    in_slack(main, tmp_path, backend=demo_backend)


def test_slash_command_acks_at_once_then_answers_with_help_and_presets(demo_backend: Any, tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        replies = {}
        for text in ("", "recipe", "Poem", "teleport", "settings"):
            envelope = await fake.send_envelope("slash_commands", fake.command_payload(text))
            assert await fake.wait_ack(envelope) < 3.0
            count = len(replies)
            await fake.wait_for(lambda count=count: len(fake.responses) > count)
            replies[text] = fake.responses[-1]
        assert all(r["response_type"] == "ephemeral" for r in replies.values())
        help_text = replies[""]["text"]
        for name in [p.name for p in env.service.presets()]:
            assert f"`{name}`" in help_text
        assert "<@UBOT>" in help_text and "thread" in help_text
        assert "```" not in help_text  # the website preset's fence is defused, not opened
        assert "What can I cook with the food in this picture?" in replies["recipe"]["text"]
        assert "<@UBOT> recipe" in replies["recipe"]["text"]
        assert "Write a poem" in replies["Poem"]["text"]
        assert replies["teleport"]["text"].startswith("I don't know `teleport`")
        assert "Model:" in replies["settings"]["text"] and "Your limits:" in replies["settings"]["text"]
        assert not fake.calls_of("chat.postMessage")

    in_slack(main, tmp_path, backend=demo_backend)


def test_socket_mode_redelivery_is_answered_once(demo_backend: Any, tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        mention = fake.picture_mention(png_bytes())
        first = await fake.send_event(mention, event_id="EvONCE")
        again = await fake.send_event(mention, event_id="EvONCE", retry_attempt=1, retry_reason="timeout")
        await fake.wait_ack(first)
        await fake.wait_ack(again)
        await env.answered(mention["ts"])
        late = await fake.send_event(mention, event_id="EvONCE", retry_attempt=2, retry_reason="timeout")
        await fake.wait_ack(late)
        await fake.settle()
        assert len(fake.bot_replies(CHANNEL, mention["ts"])) == 1
        assert len(fake.calls_of("chat.postMessage")) == 1 and not fake.ephemerals
        assert len(await env.turns(mention["ts"])) == 2
        assert env.outcomes() == {"answered": 1.0, "duplicate": 2.0}  # both redeliveries reached the core

    in_slack(main, tmp_path, backend=demo_backend)


def test_rate_limited_calls_wait_for_retry_after(demo_backend: Any, tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        fake.fail_next("chat.postMessage", 1, retry_after=1)
        fake.fail_next("chat.update", 1, retry_after=1)
        mention = fake.picture_mention(png_bytes())
        await fake.send_event(mention)
        await env.answered(mention["ts"])
        for method in ("chat.postMessage", "chat.update"):
            limited, retried = fake.calls_of(method, status=429)[0], fake.calls_of(method)[0]
            assert retried.at - limited.at >= 1.0, method  # Retry-After honoured
            assert retried.args == limited.args
        assert len(fake.bot_replies(CHANNEL, mention["ts"])) == 1  # the retry did not post twice

    in_slack(main, tmp_path, backend=demo_backend)


def test_download_problems_get_clear_ephemeral_replies(demo_backend: Any, tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        cases = {
            "files:read": fake.add_file(png_bytes(), login_page=True),
            "larger than 64 KiB": fake.add_file(b"\x89PNG" + bytes(300 * 1024), size=2048),  # size lies
            "not a picture": fake.add_file(b"%PDF-1.4", name="report.pdf", mimetype="application/pdf"),
            "did not share a download link": fake.add_file(png_bytes())
            | {"url_private_download": "https://files.example.net/F1/photo.png"},  # never send the token there
        }
        for i, (expected, file) in enumerate(cases.items()):
            mention = fake.mention(CHANNEL, "What is this?", files=[file])
            await fake.send_event(mention)
            await fake.wait_for(lambda i=i: len(fake.ephemerals) > i)
            note = fake.ephemerals[-1]
            assert expected in note["text"] and note["user"] == "UALICE" and note["channel"] == CHANNEL
            assert "thread_ts" not in note or note["thread_ts"] is None  # top-level: shown in the channel
            assert not fake.bot_replies(CHANNEL, mention["ts"])
            if expected == "not a picture":  # the formats the core reads, not a list of the front end's own
                assert f"I read {env.service.image_limits.formats_text('and')}." in note["text"]
                assert "BMP" in note["text"]
        assert [d["authorized"] for d in fake.downloads] == [True, True]  # the PDF, the foreign URL: not fetched
        assert not fake.calls_of("chat.postMessage")

    in_slack(main, tmp_path, backend=demo_backend, slack={"max_image_bytes": 64 * 1024})


def test_quota_and_notices_are_ephemeral(demo_backend: Any, tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        await env.db.set_quota("user", "slack", fake.team, "UALICE", requests_per_day=1)
        first = fake.picture_mention(png_bytes())
        await fake.send_event(first)
        await env.answered(first["ts"])

        second = fake.mention(CHANNEL, "And this?", files=[fake.add_file(png_bytes((1, 2, 3)))])
        await fake.send_event(second)
        await fake.wait_for(lambda: fake.ephemerals)
        assert "reached the limit of 1 requests per day" in fake.ephemerals[0]["text"]
        assert fake.ephemerals[0]["user"] == "UALICE"

        # In a thread: a question without any picture gets the core's helpful reply, in that thread.
        bob = fake.mention(CHANNEL, "what do you think?", user="UBOB", thread_ts="1600000000.000100")
        await fake.send_event(bob)
        await fake.wait_for(lambda: len(fake.ephemerals) == 2)
        assert "I need a picture" in fake.ephemerals[1]["text"]
        assert fake.ephemerals[1]["thread_ts"] == "1600000000.000100" and fake.ephemerals[1]["user"] == "UBOB"
        await fake.settle()
        assert not fake.bot_replies(CHANNEL, second["ts"]) and not fake.bot_replies(CHANNEL, "1600000000.000100")
        assert len(fake.calls_of("chat.postMessage")) == 1  # only the first answer

    in_slack(main, tmp_path, backend=demo_backend)


def test_bot_messages_and_edits_are_ignored(demo_backend: Any, tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        mention = fake.picture_mention(png_bytes())
        await fake.send_event(mention)
        root = mention["ts"]
        await env.answered(root)
        await fake.settle()
        calls = len(fake.calls)
        noise = [
            {"type": "message", "subtype": "bot_message", "bot_id": "BOTHER", "text": "beep", "thread_ts": root},
            {"type": "message", "user": "UOTHERBOT", "bot_id": "BOTHER", "text": "boop", "thread_ts": root},
            {"type": "message", "subtype": "message_changed", "hidden": True, "thread_ts": root,
             "message": {"user": "UALICE", "text": "edited", "ts": root}},
            {"type": "message", "subtype": "message_deleted", "hidden": True, "deleted_ts": root},
            {"type": "message", "subtype": "channel_join", "user": "UCAROL", "text": "joined", "thread_ts": root},
        ]  # fmt: skip
        envelopes = []
        for event in noise:
            event |= {"channel": CHANNEL, "channel_type": "channel", "ts": fake.new_ts()}
            envelopes.append(await fake.send_event(event))
        for envelope in envelopes:
            await fake.wait_ack(envelope)
        await fake.settle()
        assert fake.calls[calls:] == []
        assert len(await env.turns(root)) == 2

    in_slack(main, tmp_path, backend=demo_backend)


async def _mention_without_a_picture(fake: FakeSlack) -> str:
    """A mention that forgot the picture: the bot asks for one (ephemerally); the mention's ts (its thread)."""
    mention = fake.mention(CHANNEL, "what can I cook?")
    await fake.send_event(mention)
    await fake.wait_for(lambda: fake.ephemerals)
    assert "I need a picture" in fake.ephemerals[0]["text"]
    return mention["ts"]


def test_a_picture_after_the_mention_or_after_reset_needs_no_second_mention(demo_backend: Any, tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        root = await _mention_without_a_picture(fake)
        chatter = fake.user_message(CHANNEL, "haha", user="UBOB", thread_ts=root)  # text only: not for the bot
        await fake.wait_ack(await fake.send_event(chatter))
        picture = fake.user_message(CHANNEL, "here it is", thread_ts=root, files=[fake.add_file(png_bytes())])
        await fake.send_event(picture)
        turns = await env.answered(root)
        assert turns[0].text == "here it is" and turns[0].has_image
        assert len(fake.ephemerals) == 1  # Bob's chatter got nothing

        await fake.send_event(fake.mention(CHANNEL, "reset", thread_ts=root))
        await fake.wait_for(lambda: any("Starting over" in m.text for m in fake.bot_replies(CHANNEL, root)))
        assert await env.turns(root) == []  # archived
        fresh = fake.user_message(CHANNEL, "now this one", thread_ts=root, files=[fake.add_file(png_bytes((9, 9, 9)))])
        await fake.send_event(fresh)
        turns = await env.answered(root)
        assert [t.text for t in turns if t.role == "user"] == ["now this one"]

    in_slack(main, tmp_path, backend=demo_backend)


def test_a_picture_in_a_mentioned_thread_starts_the_conversation_after_a_restart(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        root = await _mention_without_a_picture(fake)

        await env.restart()  # a new core and front end on the same database: nothing kept in memory
        calls = len(fake.calls)
        chatter = fake.user_message(CHANNEL, "haha", user="UBOB", thread_ts=root)  # text only: not for the bot
        await fake.wait_ack(await fake.send_event(chatter))
        await fake.settle()
        assert [c.method for c in fake.calls[calls:] if c.method != "auth.test"] == []  # bolt's own check aside
        picture = fake.user_message(CHANNEL, "here it is", thread_ts=root, files=[fake.add_file(png_bytes())])
        await fake.send_event(picture)
        turns = await env.answered(root)
        assert turns[0].text == "here it is" and turns[0].has_image
        assert len(fake.ephemerals) == 1 and env.outcomes() == {"answered": 1.0}

    in_slack(main, tmp_path, backend=ScriptedBackend("A red square."))


def test_a_reset_thread_continues_on_a_picture_after_a_restart(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        mention = fake.picture_mention(png_bytes())
        root = mention["ts"]
        await fake.send_event(mention)
        await env.answered(root)
        await fake.send_event(fake.mention(CHANNEL, "reset", thread_ts=root))
        await fake.wait_for(lambda: any("Starting over" in m.text for m in fake.bot_replies(CHANNEL, root)))
        assert await env.turns(root) == []

        await env.restart()
        files = [fake.add_file(png_bytes((9, 9, 9)))]
        fresh = fake.user_message(CHANNEL, "now this one", thread_ts=root, files=files)
        await fake.send_event(fresh)
        turns = await env.answered(root)
        assert [t.text for t in turns if t.role == "user"] == ["now this one"] and turns[0].has_image

    in_slack(main, tmp_path, backend=ScriptedBackend("A red square."))


def test_a_download_failure_of_a_redelivered_event_is_answered_once(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        mention = fake.mention(CHANNEL, "What is this?", files=[fake.add_file(png_bytes(), login_page=True)])
        first = await fake.send_event(mention, event_id="EvNOFILE")
        again = await fake.send_event(mention, event_id="EvNOFILE", retry_attempt=1, retry_reason="timeout")
        await fake.wait_ack(first)
        await fake.wait_ack(again)
        await fake.wait_for(lambda: fake.ephemerals)
        await fake.settle()
        # Two deliveries at the same moment are handled one after the other: one download, one answer.
        assert len(fake.downloads) == 1
        fetched = len(fake.downloads)
        (note,) = fake.ephemerals
        assert "files:read" in note["text"] and note["user"] == "UALICE"
        assert env.outcomes() == {"ImageError": 1.0, "duplicate": 1.0}

        await env.restart()  # a late redelivery after a restart: still answered once
        late = await fake.send_event(mention, event_id="EvNOFILE", retry_attempt=2, retry_reason="timeout")
        await fake.wait_ack(late)
        await fake.settle()
        assert len(fake.ephemerals) == 1 and env.outcomes() == {"duplicate": 1.0}
        assert len(fake.downloads) == fetched  # the core has it: the late one fetches nothing
        assert not fake.calls_of("chat.postMessage")

    in_slack(main, tmp_path, backend=ScriptedBackend("A red square."))


def test_two_deliveries_of_one_event_at_once_download_its_picture_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 26: ``Core.seen_event`` is a read, so a retry arriving while the first delivery still downloaded
    the picture got ``False`` too and fetched it again.  The front end now handles one delivery of an event
    at a time: the second waits, then finds the event recorded and fetches nothing."""
    caplog.set_level(logging.INFO, logger="adapters.slack.app")

    def waiting() -> bool:
        return any("this one waits for it" in r.getMessage() for r in caplog.records)

    async def main(env: Env, fake: FakeSlack) -> None:
        fake.file_gate = asyncio.Event()  # the first download hangs until both deliveries are in
        mention = fake.picture_mention(png_bytes())
        first = await fake.send_event(mention, event_id="EvTWICE")
        again = await fake.send_event(mention, event_id="EvTWICE", retry_attempt=1, retry_reason="timeout")
        await fake.wait_ack(first)
        await fake.wait_ack(again)
        # Either the second delivery downloads too (each asked seen_event before anything was recorded)
        # or it waits for the first: both states are reached without a timer.
        await fake.wait_for(lambda: len(fake.downloads) == 2 or (fake.downloads and waiting()))
        fake.file_gate.set()
        await env.answered(mention["ts"])
        await fake.wait_for(lambda: env.outcomes().get("duplicate") == 1.0)
        await fake.settle()
        assert len(fake.downloads) == 1
        assert len(fake.bot_replies(CHANNEL, mention["ts"])) == 1

    in_slack(main, tmp_path, backend=ScriptedBackend("A red square."))
