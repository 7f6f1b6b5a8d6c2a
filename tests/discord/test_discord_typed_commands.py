"""Discord's app commands as typed commands (issue 22 item 1): ``/ask`` with the question "settings" (or
"help", "reset") asks about the picture instead of dropping it; ``/settings`` outside a thread follows none."""

from __future__ import annotations

from pathlib import Path

from discord_helpers import Env, FakeDiscord, ScriptedBackend, in_discord, png_bytes
from sqlalchemy import select

from storage.tables import FollowedThread


def test_discord_ask_with_a_command_word_asks_about_the_picture(tmp_path: Path) -> None:
    backend = ScriptedBackend("A red square.")

    async def main(env: Env, fake: FakeDiscord) -> None:
        for number, word in enumerate(("settings", "help", "reset"), start=1):
            picture = fake.add_attachment(png_bytes((number, 0, 0)))
            interaction = await fake.interact(fake.ask(picture, word))
            turns = await env.answered(await fake.wait_for(lambda i=interaction: i.original_id))
            assert (turns[0].role, turns[0].has_image, turns[0].text) == ("user", True, word)
        assert len(backend.calls) == 3  # each picture was asked about, none dropped for a command
        assert [c["turns"][-1] for c in backend.calls] == [
            {"role": "user", "text": word, "image": True} for word in ("settings", "help", "reset")
        ]
        assert env.outcomes() == {"answered": 3.0}

    in_discord(main, tmp_path, backend=backend)


def test_discord_settings_outside_a_thread_follows_none(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeDiscord) -> None:
        await fake.interact(fake.slash("settings"))
        await fake.wait_for(lambda: len(fake.ephemerals()) == 1)
        assert "Your limits:" in fake.ephemerals()[0].content
        async with env.db.sessions() as session:
            assert (await session.scalars(select(FollowedThread))).all() == []

    in_discord(main, tmp_path)
