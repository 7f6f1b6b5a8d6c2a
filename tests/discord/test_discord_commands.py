"""Slash commands against the fake Discord: the real discord.py client, the real core, a scripted backend."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from discord_helpers import Env, FakeDiscord, Message, ScriptedBackend, discord_env, in_discord, png_bytes

from adapters.streaming import PLACEHOLDER

NO_PINGS = {"parse": []}
REAL_PACE = {"update_interval_s": 1.0}  # the other tests edit faster than [discord] allows, to run quickly


def _no_pings(messages: list[Message]) -> None:
    assert all(m.allowed_mentions == NO_PINGS for m in messages if m.webhook_id is None or m.allowed_mentions)


def test_discord_ask_defers_at_once_streams_and_opens_a_thread_for_follow_ups(tmp_path: Path) -> None:
    backend = ScriptedBackend("A red square on a white table, seen from above.", delay=0.25)

    async def main(env: Env, fake: FakeDiscord) -> None:
        picture = fake.add_attachment(png_bytes())
        interaction = await fake.interact(fake.ask(picture, "What is in this picture?", preset="describe"))
        thread_id = await fake.first_thread()
        turns = await env.answered(thread_id, shown_in=fake.general)
        assert interaction.callbacks[0][1] == 5 and interaction.callbacks[0][0] < 1.0  # deferred at once
        assert len(interaction.callbacks) == 1
        original = fake.messages[interaction.original_id]
        assert thread_id == original.id  # the thread is started on the response, keyed by its id
        thread = fake.channels[thread_id]
        assert thread.parent_id == fake.general and thread.name == "What is in this picture?"
        assert [(t.role, t.status) for t in turns] == [("user", "done"), ("assistant", "done")]
        assert turns[0].has_image and turns[0].text.startswith("Describe this image in detail.")
        assert turns[0].text.endswith("What is in this picture?")  # the preset's prompt, then the question
        versions = [text for _, text in original.edits]
        assert versions[-1] == turns[1].text == backend.answer
        assert len(versions) >= 3 and PLACEHOLDER not in versions  # Discord's own "thinking…" instead
        assert all(v.endswith(" …") for v in versions[:-1])  # interim edits carry the streaming mark
        edits = [at for at, _ in original.edits]
        assert all(b - a >= 0.9 for a, b in itertools.pairwise(edits))  # ≥ update_interval_s apart, the last too
        assert len(fake.downloads) == 1 and fake.downloads[0]["authorization"] is None  # no token to the CDN
        assert fake.calls_of("POST", "callback")[0].at < fake.downloads[0]["at"]  # deferred before downloading
        assert all(c.body.get("allowed_mentions") == NO_PINGS for c in fake.calls_of("PATCH", "original"))
        backend.delay = 0.0

        # A message in the thread, no mention: the same conversation continues, answered in the thread.
        follow = fake.user_message(thread_id, "And what colour is the table?")
        await fake.send(follow)
        turns = await env.answered(thread_id, answers=2, shown_in=thread_id)
        assert [t.text for t in turns if t.role == "user"][1] == "And what colour is the table?"
        (reply,) = fake.bot_messages(thread_id)
        assert str(reply.reference["message_id"]) == follow["id"]  # a reply to the question, in the thread
        # A new picture in the thread joins the conversation.
        second = fake.add_attachment(png_bytes((10, 200, 30)))
        await fake.send(fake.user_message(thread_id, "and this one?", author=fake.bob, attachments=[second]))
        turns = await env.answered(thread_id, answers=3, shown_in=thread_id)
        assert turns[4].has_image and turns[4].text == "and this one?"
        assert len(backend.calls[-1]["images"]) == 2
        _no_pings(fake.bot_messages(thread_id))
        assert len(fake.threads_created) == 1 and env.outcomes() == {"answered": 3.0}
        assert await env.adapter.problem() is None

    in_discord(main, tmp_path, backend=backend, discord=REAL_PACE)


def test_discord_a_long_answer_continues_in_follow_ups_without_breaking_code_fences(tmp_path: Path) -> None:
    code = "\n".join(f"    line_{i} = compute({i})  # step {i}" for i in range(90))
    answer = "Here is the page.\n\n" + "Some words about it. " * 60 + "\n\n```python\n" + code + "\n```\n\nDone."
    assert len(answer) > 4000

    async def main(env: Env, fake: FakeDiscord) -> None:
        interaction, thread_id = await fake.slash_question(png_bytes(), "Build it")
        await env.answered(thread_id)
        await fake.settle()
        shown = [m for m in fake.bot_messages(fake.general) if m.interaction_id == interaction.id]
        assert len(shown) >= 3 and shown[0].id == interaction.original_id  # response, then follow-ups
        assert all(len(m.content) <= 2000 for m in shown)
        assert all(m.content.count("```") % 2 == 0 for m in shown)  # every part renders on its own
        joined = "".join(m.content for m in shown)
        for piece in ("Here is the page.", "line_0 = compute(0)", "line_89 = compute(89)", "Done."):
            assert joined.count(piece) == 1, piece
        assert not any(m.content.endswith(" …") for m in shown)  # the last edits carry the full text
        assert all(c.status == 200 for c in fake.calls if c.route in ("original", "followup"))

    in_discord(main, tmp_path, backend=ScriptedBackend(answer, piece=400))


def test_discord_a_429_on_an_edit_is_waited_out_and_the_last_edit_carries_the_full_text(tmp_path: Path) -> None:
    backend = ScriptedBackend("A red square on a white table.", delay=0.2)

    async def main(env: Env, fake: FakeDiscord) -> None:
        fake.fail_next("PATCH", "original", 2, retry_after=0.6)
        interaction, thread_id = await fake.slash_question(png_bytes())
        await env.answered(thread_id, shown_in=fake.general)
        limited = fake.calls_of("PATCH", "original", status=429)
        assert len(limited) == 2
        after = [c for c in fake.calls_of("PATCH", "original") if c.at > limited[-1].at]
        assert after and after[0].at - limited[-1].at >= 0.55  # retry_after honoured by discord.py
        assert fake.messages[interaction.original_id].content == backend.answer

        # The same for a message edit in the thread (bot-token route, per-channel bucket).
        fake.fail_next("PATCH", "message", 1, retry_after=0.6)
        await fake.send(fake.user_message(thread_id, "Tell me more"))
        await env.answered(thread_id, answers=2, shown_in=thread_id)
        assert len(fake.calls_of("PATCH", "message", status=429)) == 1
        assert fake.bot_messages(thread_id)[-1].content == backend.answer

    in_discord(main, tmp_path, backend=backend, discord=REAL_PACE)


def test_discord_an_answer_outliving_the_interaction_token_continues_as_channel_messages(tmp_path: Path) -> None:
    backend = ScriptedBackend("A red square on a white table, seen from above.", delay=0.4)

    async def main(env: Env, fake: FakeDiscord) -> None:
        # The token has 62.2 s left: 2.2 s before the front end stops using it (its 60 s margin).
        interaction, thread_id = await fake.slash_question(png_bytes(), age_s=15 * 60 - 62.2)
        turns = await env.answered(thread_id, shown_in=thread_id)
        assert interaction.callbacks[0][1] == 5  # deferred in time although the snowflake is old
        original = fake.messages[interaction.original_id]
        assert original.content == "_The answer continues in the thread._"
        assert any(text.endswith(" …") for _, text in original.edits)  # it streamed there first
        (continued,) = fake.bot_messages(thread_id)
        assert continued.content == turns[1].text == backend.answer and continued.webhook_id is None
        assert continued.allowed_mentions == NO_PINGS
        assert not [c for c in fake.calls if c.status == 401]

        # Received with only 30 s left (inside the margin): deferred, then answered in the thread at once.
        backend.delay = 0.0
        late = await fake.interact(fake.ask(fake.add_attachment(png_bytes()), "Again?", age_s=15 * 60 - 30))
        await fake.wait_for(lambda: len(fake.threads_created) == 2)
        turns = await env.answered(late.original_id, shown_in=late.original_id)
        assert fake.messages[late.original_id].content == "_The answer continues in the thread._"
        assert fake.bot_messages(late.original_id)[-1].content == turns[1].text
        assert not [c for c in fake.calls if c.status == 401]

    in_discord(main, tmp_path, backend=backend, discord=REAL_PACE)


def test_discord_an_expired_token_mid_answer_still_ends_with_the_full_text(tmp_path: Path) -> None:
    backend = ScriptedBackend("A red square on a white table, seen from above.", delay=0.3)

    async def main(env: Env, fake: FakeDiscord) -> None:
        env.adapter.token_margin = -env.adapter.token_margin  # trust the token past its end: Discord refuses it
        interaction, thread_id = await fake.slash_question(png_bytes(), age_s=15 * 60 - 1.2)
        turns = await env.answered(thread_id, shown_in=thread_id)
        assert [c for c in fake.calls if c.status == 401]  # the webhook refused the spent token
        assert fake.bot_messages(thread_id)[-1].content == turns[1].text == backend.answer
        assert fake.messages[interaction.original_id].content != backend.answer

    in_discord(main, tmp_path, backend=backend, discord=REAL_PACE)


def test_discord_help_settings_and_reset(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeDiscord) -> None:
        await fake.interact(fake.slash("help"))
        (help_message,) = await fake.wait_for(lambda: fake.ephemerals())
        assert "MiniGPT-4 answers questions about pictures" in help_message.content
        assert "/ask" in help_message.content and f"<@{fake.app_id}>" in help_message.content
        assert len(help_message.content) <= 2000

        await fake.interact(fake.slash("settings"))
        await fake.wait_for(lambda: len(fake.ephemerals()) == 2)
        settings = fake.ephemerals()[1].content
        assert "Model:" in settings and "Your limits:" in settings

        # /reset at the top level has nothing to reset: a hint to the asker.
        await fake.interact(fake.slash("reset"))
        await fake.wait_for(lambda: len(fake.ephemerals()) == 3)
        assert "inside a conversation thread" in fake.ephemerals()[2].content

        interaction, thread_id = await fake.slash_question(png_bytes())
        await env.answered(thread_id)
        reset = await fake.interact(fake.slash("reset", channel=thread_id))
        await fake.wait_for(lambda: reset.original_id and "Starting over" in fake.messages[reset.original_id].content)
        assert await env.turns(thread_id) == []
        assert not fake.messages[reset.original_id].ephemeral  # everyone in the thread sees it
        # After the reset, a picture in the thread starts anew, no mention needed.
        fresh = fake.add_attachment(png_bytes((1, 2, 3)))
        await fake.send(fake.user_message(thread_id, "now this one", attachments=[fresh]))
        turns = await env.answered(thread_id, shown_in=thread_id)
        assert [t.text for t in turns if t.role == "user"] == ["now this one"]
        assert interaction.original_id == thread_id

    in_discord(main, tmp_path)


def test_discord_commands_are_registered_once_and_again_only_when_they_change(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeDiscord) -> None:
        assert fake.command_writes == [("global", ["ask", "reset", "help", "settings"])]
        ask = fake.command("ask")
        preset = next(o for o in ask["options"] if o["name"] == "preset")
        assert [c["value"] for c in preset["choices"]] == [p.name for p in env.service.presets()]
        assert [o["name"] for o in ask["options"]] == ["image", "question", "preset"]
        # The formats are the core's (issue 26, item 11): BMP and HEIC were missing from a list of its own.
        image = next(o for o in ask["options"] if o["name"] == "image")
        formats = env.service.image_limits.formats_text()
        assert image["description"] == f"The picture ({formats})" and "BMP" in formats and "WebP" in formats

        await env.restart()  # same definitions: compared, not re-registered
        assert len(fake.command_writes) == 1 and len(fake.calls_of("GET", "commands")) == 2

        # A follow-up after the restart continues from SQL.
        interaction, thread_id = await fake.slash_question(png_bytes())
        await env.answered(thread_id)
        await env.restart()
        await fake.send(fake.user_message(thread_id, "Is it big?"))
        turns = await env.answered(thread_id, answers=2, shown_in=thread_id)
        assert [t.text for t in turns if t.role == "user"][-1] == "Is it big?"
        assert interaction.original_id == thread_id

        env.settings = env.settings.model_copy(
            update={
                "presets": env.settings.presets.model_copy(
                    update={"prompts": {**env.settings.presets.prompts, "haiku": "Write a haiku about this image."}}
                )
            }
        )
        await env.restart()  # a new preset changes /ask: registered once more
        assert len(fake.command_writes) == 2
        preset = next(o for o in fake.command("ask")["options"] if o["name"] == "preset")
        assert "haiku" in [c["value"] for c in preset["choices"]]
        await env.restart()
        assert len(fake.command_writes) == 2

    in_discord(main, tmp_path)


def test_discord_guild_commands_for_development_servers(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeDiscord()
        async with discord_env(tmp_path, fake=fake, discord={"guild_ids": [fake.guild_id]}) as env:
            assert fake.command_writes == [(str(fake.guild_id), ["ask", "reset", "help", "settings"])]
            assert "global" not in fake.commands
            interaction, thread_id = await fake.slash_question(png_bytes())
            await env.answered(thread_id, shown_in=fake.general)
            assert interaction.original_id == thread_id
            await env.restart()
            assert len(fake.command_writes) == 1

    asyncio.run(main())


def test_discord_ask_in_a_dm_and_inside_a_thread(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeDiscord) -> None:
        interaction = await fake.interact(fake.ask(fake.add_attachment(png_bytes()), "What is this?", channel=fake.dm))
        turns = await env.answered(fake.dm, channel=fake.dm, workspace="dm")
        await fake.wait_for(lambda: fake.messages[interaction.original_id].content == turns[1].text)
        assert not fake.threads_created  # no threads in DMs: the DM is the conversation
        await fake.send(fake.user_message(fake.dm, "Is it big?"))
        turns = await env.answered(fake.dm, answers=2, channel=fake.dm, workspace="dm", shown_in=fake.dm)

        _mention, thread_id = await fake.picture_question(png_bytes())
        await env.answered(thread_id, shown_in=thread_id)
        # /ask inside the thread joins its conversation (no thread in a thread).
        second = await fake.interact(fake.ask(fake.add_attachment(png_bytes((0, 0, 9))), "And now?", channel=thread_id))
        turns = await env.answered(thread_id, answers=2)
        await fake.wait_for(lambda: fake.messages[second.original_id].content == turns[-1].text)
        assert len(fake.threads_created) == 1 and fake.messages[second.original_id].channel_id == thread_id

    in_discord(main, tmp_path)
