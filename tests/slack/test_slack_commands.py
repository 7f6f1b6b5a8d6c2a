"""Slack's slash command as a typed command (issue 22 item 1): ``/minigpt4 settings`` reaches the core as
``Command.SETTINGS`` with no thread, so no thread the bot never spoke in is followed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slack_helpers import CHANNEL, Env, FakeSlack, in_slack, png_bytes
from sqlalchemy import select

from storage.tables import FollowedThread


async def _followed(env: Any) -> list[tuple[str, str, str]]:
    async with env.db.sessions() as session:
        rows = (await session.scalars(select(FollowedThread))).all()
        return [(r.workspace, r.channel, r.thread) for r in rows]


def test_slash_settings_follows_no_thread(demo_backend: Any, tmp_path: Path) -> None:
    async def main(env: Env, fake: FakeSlack) -> None:
        envelope = await fake.send_envelope("slash_commands", fake.command_payload("settings"))
        await fake.wait_ack(envelope)
        await fake.wait_for(lambda: len(fake.responses) == 1)
        assert "Model:" in fake.responses[0]["text"] and "Your limits:" in fake.responses[0]["text"]
        assert await _followed(env) == []  # was ("T…", "C0GENERAL", "slash-command"): a thread that is not
        assert env.outcomes() == {"answered": 1.0}

        # A mention still follows its thread: the change is the command's alone.
        root = await fake.ask(png_bytes())
        await env.answered(root)
        assert await _followed(env) == [(fake.team, CHANNEL, root)]

    in_slack(main, tmp_path, backend=demo_backend)
