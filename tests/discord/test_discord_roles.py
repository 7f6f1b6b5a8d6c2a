"""Access rules by server role, end to end: ``admin allow|deny role`` → the fake Discord → real discord.py → the core.

The fake sends each user's roles as ``member.roles`` in MESSAGE_CREATE and INTERACTION_CREATE and the server's
roles in GUILD_CREATE (or GUILD_ROLE_CREATE), so discord.py builds real ``Member`` objects with real roles.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from discord_helpers import Env, FakeDiscord, discord_env, in_discord, png_bytes
from typer.testing import CliRunner

from bot.cli.main import app

DENIED = "not enabled for you here"  # the core's AccessDenied text (tests/bot/test_service.py checks the same)


@pytest.fixture(autouse=True)
def _no_environment_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINIGPT4_BOT_DATABASE_URL", raising=False)
    monkeypatch.delenv("MINIGPT4_BOT_CONFIG", raising=False)


async def admin(env: Env, folder: Path, *args: str) -> str:
    """``minigpt4-bot admin …`` on the bot's own database (in a thread: the command runs its own event loop)."""
    config = folder / "bot.toml"
    config.write_text(f'data_dir = "state"\n\n[database]\nurl = "{env.url.replace("+aiosqlite", "")}"\n')
    result = await asyncio.to_thread(CliRunner().invoke, app, ["admin", *args, "--config", str(config)])
    assert result.exit_code == 0, result.output
    env.service._access.invalidate()  # the admin CLI is another process in production; the core's cache expires
    return result.output


def test_discord_role_allow_list_through_mentions_and_ask(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeDiscord()
        ml_team = await fake.add_role("ML team", members=(fake.alice,))  # in GUILD_CREATE
        async with discord_env(tmp_path, fake=fake) as env:
            added = await admin(env, tmp_path, "allow", "role", str(ml_team), "-p", "discord", "--note", "ML team")
            assert f"Added: allow role {ml_team} on discord" in added

            # Alice has the role: her mention is answered in a thread.
            mention = fake.user_message(fake.general, "What is this?", mention=True,
                                        attachments=[fake.add_attachment(png_bytes())])  # fmt: skip
            assert mention["member"]["roles"] == [str(ml_team)]
            await fake.send(mention)
            thread_id = await fake.first_thread()
            await env.answered(thread_id, shown_in=thread_id)

            # Bob has not: a reply saying so, no thread, nothing stored.
            refused = fake.user_message(fake.general, "And this?", author=fake.bob, mention=True,
                                        attachments=[fake.add_attachment(png_bytes())])  # fmt: skip
            await fake.send(refused)
            reply = await fake.wait_for(lambda: [m for m in fake.bot_messages(fake.general) if m.reference])
            assert DENIED in reply[0].content and str(reply[0].reference["message_id"]) == refused["id"]
            assert len(fake.threads_created) == 1 and await env.turns(refused["id"]) == []
            # …also in Alice's thread, where no mention is needed.
            await fake.send(fake.user_message(thread_id, "Is it big?", author=fake.bob))
            await fake.wait_for(lambda: any(DENIED in m.content for m in fake.bot_messages(thread_id)))
            assert len(await env.turns(thread_id)) == 2

            # The slash command: Alice is answered, Bob is told (only he sees it).
            await fake.interact(fake.ask(fake.add_attachment(png_bytes((1, 2, 3))), "What now?"))
            await fake.wait_for(lambda: len(fake.threads_created) == 2)
            await env.answered(fake.threads_created[1], shown_in=fake.general)
            bobs = await fake.interact(fake.ask(fake.add_attachment(png_bytes()), "Mine?", user=fake.bob))
            (notice,) = await fake.wait_for(lambda: fake.ephemerals())
            assert DENIED in notice.content and notice.interaction_id == bobs.id
            assert len(fake.threads_created) == 2
            await fake.interact(fake.slash("settings", user=fake.bob))
            await fake.wait_for(lambda: len(fake.ephemerals()) == 2)
            assert DENIED in fake.ephemerals()[1].content
            await fake.interact(fake.slash("settings"))  # Alice: her settings
            await fake.wait_for(lambda: len(fake.ephemerals()) == 3)
            assert "Model:" in fake.ephemerals()[2].content

            # A DM has no server and no roles: with a role allow-list it is refused, even for Alice.
            await fake.send(fake.user_message(fake.dm, "Hi?", attachments=[fake.add_attachment(png_bytes())]))
            await fake.wait_for(lambda: any(DENIED in m.content for m in fake.bot_messages(fake.dm)))
            assert env.outcomes()["AccessDenied"] == 5.0

    asyncio.run(main())


def test_discord_denied_role_wins_and_roles_made_while_running_count(tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeDiscord) -> None:
        # Made while the bot is connected (GUILD_ROLE_CREATE): the client knows it at once.
        muted = await fake.add_role("Muted", members=(fake.bob,))
        await admin(env, tmp_path, "deny", "role", str(muted), "-p", "discord")

        # Only a deny rule: members without the role pass, and so do DMs (no role there to deny).
        await fake.send(fake.user_message(fake.dm, "What?", attachments=[fake.add_attachment(png_bytes())]))
        await env.answered(fake.dm, channel=fake.dm, workspace="dm", shown_in=fake.dm)
        _, thread_id = await fake.slash_question(png_bytes())
        await env.answered(thread_id, shown_in=fake.general)
        bobs = await fake.interact(fake.ask(fake.add_attachment(png_bytes()), "Mine?", user=fake.bob))
        (notice,) = await fake.wait_for(lambda: fake.ephemerals())
        assert DENIED in notice.content and notice.interaction_id == bobs.id

        # Bob gets an allowed role too: the denied one still wins.
        helpers = await fake.add_role("Helpers", members=(fake.bob, fake.alice))
        await admin(env, tmp_path, "allow", "role", str(helpers), "-p", "discord")
        mention = fake.user_message(fake.general, "Now?", author=fake.bob, mention=True,
                                    attachments=[fake.add_attachment(png_bytes())])  # fmt: skip
        await fake.send(mention)
        reply = await fake.wait_for(lambda: [m for m in fake.bot_messages(fake.general) if m.reference])
        assert DENIED in reply[0].content and len(fake.threads_created) == 1
        # Without the denied role Bob passes on the allowed one.
        fake.member_roles[fake.bob["id"]].remove(str(muted))
        await fake.send(fake.user_message(fake.general, "Now?", author=fake.bob, mention=True,
                                          attachments=[fake.add_attachment(png_bytes())]))  # fmt: skip
        await fake.wait_for(lambda: len(fake.threads_created) == 2)
        await env.answered(fake.threads_created[1], shown_in=fake.threads_created[1])

        # @everyone (the server's id) is not one of a member's roles: allowing it lets no one in by role.
        await admin(env, tmp_path, "allow", "role", str(fake.guild_id), "-p", "discord")
        await admin(env, tmp_path, "allow", "role", str(helpers), "-p", "discord", "--remove")
        await fake.interact(fake.ask(fake.add_attachment(png_bytes()), "Again?"))
        await fake.wait_for(lambda: len(fake.ephemerals()) == 2)
        assert DENIED in fake.ephemerals()[1].content

    in_discord(main, tmp_path)
