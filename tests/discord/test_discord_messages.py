"""Mentions, threads, DMs, pictures and refusals against the fake Discord (real discord.py, real core)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from discord_helpers import Env, FakeDiscord, ScriptedBackend, discord_env, in_discord, png_bytes

from model.engine.contract import Busy

NO_PINGS = {"parse": []}


def test_discord_mention_with_a_picture_answers_in_a_thread_on_the_message(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeDiscord) -> None:
        mention = fake.user_message(fake.general, "What is in this picture?", mention=True,
                                    attachments=[fake.add_attachment(png_bytes())])  # fmt: skip
        await fake.send(mention)
        thread_id = await fake.first_thread()
        assert str(thread_id) == mention["id"]  # started on the user's message
        turns = await env.answered(thread_id, shown_in=thread_id)
        assert turns[0].text == "What is in this picture?" and turns[0].has_image  # the mention stripped
        (answer,) = fake.bot_messages(thread_id)
        assert answer.content == turns[1].text and "@\u200beveryone" in answer.content  # no mass mention
        assert answer.allowed_mentions == NO_PINGS and answer.reference is None
        assert fake.channels[thread_id].name == "What is in this picture?"
        assert not fake.bot_messages(fake.general)  # nothing in the channel itself

        # Anyone's message in the thread continues it; the bot's own echoed messages are ignored.
        await fake.send(fake.user_message(thread_id, "Is it big?", author=fake.bob))
        turns = await env.answered(thread_id, answers=2, shown_in=thread_id)
        assert [t.text for t in turns if t.role == "user"] == ["What is in this picture?", "Is it big?"]

        # A mention through the bot's managed role works too (a new conversation, a new thread).
        by_role = fake.user_message(fake.general, "and this?", role_mention=True,
                                    attachments=[fake.add_attachment(png_bytes((5, 5, 5)))])  # fmt: skip
        await fake.send(by_role)
        await fake.wait_for(lambda: len(fake.threads_created) == 2)
        turns = await env.answered(fake.threads_created[1], shown_in=fake.threads_created[1])
        assert turns[0].text == "and this?"
        assert env.outcomes() == {"answered": 3.0}

    in_discord(main, tmp_path, backend=ScriptedBackend("A red square. @everyone look!"))


def test_discord_where_threads_are_not_allowed_the_answer_is_a_reply(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeDiscord) -> None:
        fake.channels[fake.general].threads_allowed = False  # no Create Public Threads permission here
        for channel in (fake.general, fake.voice):
            mention = fake.user_message(channel, "What is this?", mention=True,
                                        attachments=[fake.add_attachment(png_bytes())])  # fmt: skip
            await fake.send(mention)
            await env.answered(mention["id"], channel=channel, shown_in=channel)
            (reply,) = fake.bot_messages(channel)
            assert str(reply.reference["message_id"]) == mention["id"] and reply.allowed_mentions == NO_PINGS
        assert not fake.threads_created
        assert len(fake.calls_of("POST", "threads", status=403)) == 1  # the voice chat was not even tried

    in_discord(main, tmp_path)


def test_discord_dm_needs_no_mention_and_is_one_conversation(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeDiscord) -> None:
        first = fake.user_message(fake.dm, "What is this?", attachments=[fake.add_attachment(png_bytes())])
        await fake.send(first)
        turns = await env.answered(fake.dm, channel=fake.dm, workspace="dm", shown_in=fake.dm)
        assert turns[0].text == "What is this?" and turns[0].has_image
        typing = fake.calls_of("POST", "typing", status=204)  # "typing…" while the model had not begun
        assert typing and typing[0].path == f"/channels/{fake.dm}/typing"
        await fake.send(fake.user_message(fake.dm, "Is it dark?"))
        turns = await env.answered(fake.dm, answers=2, channel=fake.dm, workspace="dm", shown_in=fake.dm)
        assert [t.text for t in turns if t.role == "user"] == ["What is this?", "Is it dark?"]
        replies = fake.bot_messages(fake.dm)
        assert len(replies) == 2 and str(replies[0].reference["message_id"]) == first["id"]
        assert not fake.threads_created
        await fake.send(fake.user_message(fake.dm, "reset"))
        await fake.wait_for(lambda: any("Starting over" in m.content for m in fake.bot_messages(fake.dm)))
        assert await env.turns(fake.dm, fake.dm, "dm") == []

    in_discord(main, tmp_path, backend=ScriptedBackend("A red square.", delay=0.4))


def test_discord_messages_of_bots_webhooks_and_chatter_are_ignored(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeDiscord) -> None:
        _mention, thread_id = await fake.picture_question(png_bytes())
        await env.answered(thread_id, shown_in=thread_id)
        await fake.settle(0.3)
        calls = len(fake.calls)
        picture = [fake.add_attachment(png_bytes())]
        noise = [
            fake.user_message(thread_id, "beep", author=fake.other_bot),  # another bot, in a live thread
            fake.user_message(fake.general, "boop", author=fake.other_bot, mention=True, attachments=picture),
            fake.user_message(thread_id, "hello", author=fake.bot_user),  # its own message
            fake.user_message(fake.general, "lunch anyone?"),  # no mention, not in a thread
            fake.user_message(fake.general, "a picture for the team", attachments=picture),
            fake.user_message(thread_id, "webhook post") | {"webhook_id": "123"},
            fake.user_message(thread_id, "") | {"type": 18},  # "started a thread" system message
        ]
        for payload in noise:
            await fake.send(payload)
        await fake.settle(0.5)
        assert fake.calls[calls:] == [] and not fake.downloads[1:]
        assert len(await env.turns(thread_id)) == 2

    in_discord(main, tmp_path)


def test_discord_quota_and_busy_replies(tmp_path: Path) -> None:
    backend = ScriptedBackend("A red square.")

    async def main(env: Env, fake: FakeDiscord) -> None:
        _, thread_id = await fake.slash_question(png_bytes())
        await env.answered(thread_id, shown_in=fake.general)

        # Over quota through /ask: only the asker sees why; the "thinking…" response is removed, no thread.
        second = await fake.interact(fake.ask(fake.add_attachment(png_bytes((1, 1, 1))), "And this?"))
        (notice,) = await fake.wait_for(lambda: fake.ephemerals())
        assert "reached the limit of 1 requests per day" in notice.content and notice.interaction_id == second.id
        assert fake.messages[second.original_id].deleted and len(fake.threads_created) == 1
        # …and through a mention: a reply to the message (Discord has no ephemeral messages there).
        mention = fake.user_message(fake.general, "And this?", mention=True,
                                    attachments=[fake.add_attachment(png_bytes())])  # fmt: skip
        await fake.send(mention)
        reply = await fake.wait_for(lambda: [m for m in fake.bot_messages(fake.general) if m.reference])
        assert "reached the limit" in reply[0].content and str(reply[0].reference["message_id"]) == mention["id"]
        assert len(fake.threads_created) == 1  # no thread for a refusal

        # Busy: Bob (under quota) is told to try again, in the response, without a thread.
        backend.fail = Busy("queue full", 12.0)
        busy = await fake.interact(fake.ask(fake.add_attachment(png_bytes()), "What now?", user=fake.bob))
        await fake.wait_for(lambda: busy.original_id and "try again" in fake.messages[busy.original_id].content)
        text = fake.messages[busy.original_id].content
        assert text.startswith("⚠️ ") and "12 seconds" in text
        assert len(fake.threads_created) == 1
        outcomes = env.outcomes()
        assert outcomes["QuotaExceeded"] == 2.0 and outcomes["BusyError"] == 1.0

    in_discord(main, tmp_path, backend=backend, quotas={"user": {"requests_per_day": 1}})


def test_discord_bad_attachments_get_a_clear_reply(tmp_path: Path) -> None:
    settings = {"max_image_bytes": 64 * 1024}

    async def main(env: Env, fake: FakeDiscord) -> None:
        cases = {
            "is not a picture": fake.add_attachment(b"%PDF-1.4", "report.pdf", "application/pdf"),
            "larger than 64 KiB": fake.add_attachment(png_bytes(), size=200 * 1024),
            "more than I read": fake.add_attachment(png_bytes(), width=4000, height=3000),
            "has expired": fake.add_attachment(png_bytes(), expires_in=-5),  # the CDN link is dead
            "not an image I can read": fake.add_attachment(b"\x89PNG not really"),  # the core's check
        }
        for i, (expected, attachment) in enumerate(cases.items()):
            mention = fake.user_message(fake.general, "What is this?", mention=True, attachments=[attachment])
            await fake.send(mention)
            replies = await fake.wait_for(lambda i=i: len(fake.bot_messages(fake.general)) > i and
                                          fake.bot_messages(fake.general))  # fmt: skip
            assert expected in replies[i].content, (expected, replies[i].content)
            assert str(replies[i].reference["message_id"]) == mention["id"]
        assert [d["ok"] for d in fake.downloads] == [False, True]  # only the expired link and the fake PNG
        assert not fake.threads_created

        interaction = await fake.interact(fake.ask(cases["is not a picture"], "What is this?"))
        (notice,) = await fake.wait_for(lambda: fake.ephemerals())
        assert "is not a picture" in notice.content and notice.interaction_id == interaction.id
        assert f"I read {env.service.image_limits.formats_text('and')}." in notice.content  # the core's formats
        assert "BMP" in notice.content

    in_discord(main, tmp_path, discord=settings, images={"max_pixels": 1_000_000})


def test_discord_a_thread_unknown_after_a_restart_is_looked_up(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeDiscord) -> None:
        mention = fake.user_message(fake.general, "What can I cook?", mention=True)  # forgot the picture
        await fake.send(mention)
        reply = await fake.wait_for(lambda: fake.bot_messages(fake.general))
        assert "I need a picture" in reply[0].content and not fake.threads_created

        _answer, thread_id = await fake.picture_question(png_bytes())
        await env.answered(thread_id, shown_in=thread_id)

        fake.list_threads = False  # after the restart discord.py does not know the thread
        await env.restart()
        await fake.send(fake.user_message(thread_id, "Is it fresh?"))
        turns = await env.answered(thread_id, answers=2, shown_in=thread_id)
        assert [t.text for t in turns if t.role == "user"][-1] == "Is it fresh?"
        assert len(fake.calls_of("GET", "channel")) == 1
        await fake.send(fake.user_message(thread_id, "And salty?"))
        await env.answered(thread_id, answers=3, shown_in=thread_id)
        assert len(fake.calls_of("GET", "channel")) == 1  # looked up once

    in_discord(main, tmp_path)


def test_discord_a_redelivered_message_is_answered_once(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeDiscord) -> None:
        mention, thread_id = await fake.picture_question(png_bytes())
        await env.answered(thread_id, shown_in=thread_id)
        await fake.send(mention)  # a gateway replay of the same message
        await fake.settle(0.6)
        assert len(fake.bot_messages(thread_id)) == 1 and env.outcomes() == {"answered": 1.0, "duplicate": 1.0}
        assert len(fake.threads_created) == 1

    in_discord(main, tmp_path)


def test_discord_without_the_message_content_intent_the_bot_does_not_start(tmp_path: Path) -> None:
    async def main() -> None:
        from bot.core.frontend_api import FrontEndSetupError

        try:
            async with discord_env(tmp_path, fake=FakeDiscord(allow_message_content=False)):
                raise AssertionError("started without the intent")
        except FrontEndSetupError as exc:
            message = str(exc)
        assert "Message Content" in message and "Privileged Gateway Intents" in message and "\n" not in message

    asyncio.run(main())


class _Renderer:
    """A page renderer for the website preset's previews (no Chromium in these tests)."""

    async def render(self, html: str) -> bytes:
        return png_bytes((0, 0, 255))

    async def close(self) -> None:
        return None


def test_discord_website_answers_come_with_the_preview_and_the_page(tmp_path: Path) -> None:
    page = "```html\n<!DOCTYPE html>\n<html><body><h1>Hello</h1></body></html>\n```"

    async def main(env: Env, fake: FakeDiscord) -> None:
        interaction = await fake.interact(fake.ask(fake.add_attachment(png_bytes()), preset="website"))
        with_files = await fake.wait_for(lambda: [m for m in fake.bot_messages(fake.general) if m.uploads])
        assert [u["filename"] for u in with_files[0].uploads] == ["website.png", "website.html"]
        assert with_files[0].interaction_id == interaction.id  # a follow-up of the /ask response
        assert b"<h1>Hello</h1>" in with_files[0].uploads[1]["data"]

        # A mention: the files go into the answer's thread; without Attach Files a note says so.
        fake.channels[fake.general].uploads_allowed = False
        mention = fake.user_message(fake.general, "website", mention=True,
                                    attachments=[fake.add_attachment(png_bytes())])  # fmt: skip
        await fake.send(mention)
        thread_id = int(mention["id"])
        await fake.wait_for(lambda: thread_id in fake.channels and fake.bot_messages(thread_id))
        note = await fake.wait_for(lambda: [m for m in fake.bot_messages(thread_id) if "Attach Files" in m.content])
        assert "website.png, website.html" in note[0].content

    in_discord(main, tmp_path, backend=ScriptedBackend(page), renderer=_Renderer())


def test_discord_a_thread_with_an_id_of_its_own_still_continues_the_conversation(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeDiscord) -> None:
        fake.thread_ids_from_messages = False  # not Discord's rule, but the key must not depend on it
        mention, thread_id = await fake.picture_question(png_bytes())
        assert str(thread_id) != mention["id"]
        await env.answered(mention["id"], shown_in=thread_id)
        await fake.send(fake.user_message(thread_id, "Is it big?"))
        turns = await env.answered(mention["id"], answers=2, shown_in=thread_id)
        assert [t.text for t in turns if t.role == "user"] == ["What is this?", "Is it big?"]

    in_discord(main, tmp_path)


def test_grounding_discord_attaches_the_annotated_picture(tmp_path: Path) -> None:
    """MiniGPT-v2's boxes (issue 24): /ask and a mention both get the picture with the boxes drawn."""
    answer = "<p>a boat</p> {<20><30><60><70>}"

    async def main(env: Env, fake: FakeDiscord) -> None:
        interaction = await fake.interact(fake.ask(fake.add_attachment(png_bytes()), preset="grounding"))
        with_files = await fake.wait_for(lambda: [m for m in fake.bot_messages(fake.general) if m.uploads])
        assert [u["filename"] for u in with_files[0].uploads] == ["boxes.png"]
        assert with_files[0].uploads[0]["data"].startswith(b"\x89PNG")
        assert with_files[0].interaction_id == interaction.id
        shown = await fake.wait_for(lambda: [m for m in fake.bot_messages(fake.general) if "**a boat**" in m.content])
        assert "{<" not in shown[0].content

        mention = fake.user_message(fake.general, "/detection boats", mention=True,
                                    attachments=[fake.add_attachment(png_bytes())])  # fmt: skip
        await fake.send(mention)
        thread_id = int(mention["id"])
        uploaded = await fake.wait_for(lambda: thread_id in fake.channels and [
            m for m in fake.bot_messages(thread_id) if m.uploads])  # fmt: skip
        assert [u["filename"] for u in uploaded[0].uploads] == ["boxes.png"]

    in_discord(main, tmp_path, backend=ScriptedBackend(answer), model={"variant": "minigptv2"})
