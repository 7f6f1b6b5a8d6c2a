"""Starting and stopping the Discord front end: the token, the gateway, readiness, ``serve``, settings, command sync."""

from __future__ import annotations

import asyncio
import logging
import signal
import tomllib
from pathlib import Path
from typing import Any

import pytest
from discord_helpers import FakeDiscord, ScriptedBackend, discord_env, png_bytes
from pydantic import ValidationError

import bot.cli.serve as serve
from adapters.discord import FRONT_END, DiscordSettings
from adapters.discord.app import DiscordFrontEnd, DiscordToken
from adapters.discord.commands import differences
from bot.core.backend_api import BackendPlugin
from bot.core.config import Settings
from bot.core.frontend_api import FrontEndContext, FrontEndSetupError, ImageLimits
from bot.core.plugins import BACKENDS, load_plugin

ROOT = Path(__file__).resolve().parents[2]


def test_discord_settings_and_their_documented_defaults() -> None:
    table = tomllib.loads((ROOT / "bot.toml").read_text())["discord"]
    assert DiscordSettings.model_validate(table) == DiscordSettings()
    assert set(table) == set(DiscordSettings.model_fields)
    assert DiscordSettings().model_dump() == {"enabled": False, "guild_ids": [], "update_interval_s": 1.0,
                                              "max_message_chars": 2000, "max_image_bytes": 0}  # fmt: skip
    assert DiscordSettings(guild_ids=["123", 123, 456]).guild_ids == [123, 456]
    for bad in ({"update_interval_s": 0.5}, {"max_message_chars": 2001}, {"guild_ids": [0]}, {"token": "x"},
                {"max_image_bytes": -1}):  # fmt: skip
        with pytest.raises(ValidationError):
            DiscordSettings.model_validate(bad)
    assert FRONT_END.name == "discord" and FRONT_END.docs == "docs/discord.md" and (ROOT / FRONT_END.docs).is_file()


def test_discord_token_comes_from_the_environment_and_is_never_shown() -> None:
    token = DiscordToken.from_env({"DISCORD_BOT_TOKEN": "  Bot secret.token.value "})
    assert token.value == "secret.token.value" and "secret" not in repr(token)
    with pytest.raises(FrontEndSetupError, match=r"DISCORD_BOT_TOKEN is not set: .*Developer Portal.*Bot"):
        DiscordToken.from_env({})


def test_discord_a_missing_or_rejected_token_stops_start_with_one_line(tmp_path: Path) -> None:
    async def main() -> list[str]:
        fake = await FakeDiscord().start()
        messages = []
        try:
            async with fake.routed():
                for environ in ({}, {"DISCORD_BOT_TOKEN": "wrong.token.here"}):
                    adapter = DiscordFrontEnd(_NoCore(), DiscordSettings(enabled=True), environ=environ)
                    with pytest.raises(FrontEndSetupError) as info:
                        await adapter.start()
                    messages.append(str(info.value))
                    assert await adapter.problem() is not None
        finally:
            await fake.close()
        return messages

    missing, rejected = asyncio.run(main())
    assert missing.startswith("DISCORD_BOT_TOKEN is not set")
    assert rejected.startswith("Discord rejected DISCORD_BOT_TOKEN (401") and "Reset Token" in rejected
    assert all("\n" not in m and "wrong.token" not in m for m in (missing, rejected))


class _NoCore:
    """Enough of a core for start-up failures (nothing is ever asked)."""

    def presets(self, workspace: str = "", channel: str = "") -> list:
        return []

    @property
    def image_limits(self) -> ImageLimits:  # /ask names the formats: read when the commands are made
        return ImageLimits(1024, 1024, 1, ("PNG",))


def test_discord_readiness_follows_the_gateway(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        async with discord_env(tmp_path) as env:
            fake, adapter = env.fake, env.adapter
            assert await adapter.problem() is None
            identify = fake.identifies[-1]
            assert identify["intents"] & (1 << 15) and identify["token"] == fake.token  # message_content asked for
            assert fake.compression in ("zlib-stream", "zstd-stream") and fake.heartbeats >= 1
            problems = []

            async def watch() -> None:
                while True:
                    problems.append(await adapter.problem())
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch())
            fake.gateway_open.clear()  # the reconnection hangs for a while
            await fake.drop_connection()
            await fake.wait_for(lambda: problems[-1] is not None, timeout=5)
            assert problems[-1] == "Discord gateway disconnected (reconnecting)"
            fake.gateway_open.set()
            await fake.wait_for(lambda: fake.resumes == 1 and problems[-1] is None, timeout=10)
            watcher.cancel()
            # Still serving after the resume.
            _mention, thread_id = await fake.picture_question(png_bytes())
            await env.answered(thread_id, shown_in=thread_id)
            await adapter.stop()
            assert await adapter.problem() == "Discord: stopped"

    asyncio.run(main())
    text = caplog.text
    assert "message_content" in text and "thread follow-ups without a mention" in text  # the one intents line
    assert "permissions=309237746688" in text and "scope=bot+applications.commands" in text  # the invite URL
    assert "fake.bot-token" not in text  # the token never reaches the log


def _scripted_backends(monkeypatch: pytest.MonkeyPatch) -> ScriptedBackend:
    backend = ScriptedBackend("A red square.")

    async def ready(_settings: Any, **_kw: Any) -> ScriptedBackend:
        return backend

    def load(group: str, name: str) -> Any:
        if group == BACKENDS:
            return BackendPlugin("scripted", ready)
        return load_plugin(group, name)

    monkeypatch.setattr(serve, "load_plugin", load)
    return backend


def test_discord_serve_starts_it_next_to_the_others_with_the_token_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    backend = _scripted_backends(monkeypatch)
    settings = Settings.model_validate({
        "data_dir": str(tmp_path / "data"), "web": {"enabled": True, "port": 0}, "discord": {"enabled": True},
    })  # fmt: skip

    async def main() -> int:
        fake = await FakeDiscord().start()
        try:
            async with fake.routed():
                monkeypatch.setenv("DISCORD_BOT_TOKEN", fake.token)
                task = asyncio.create_task(serve.run_bot(settings, terminal=False))
                await fake.wait_for(lambda: fake.identifies and fake.command_writes, timeout=30)
                interaction = await fake.interact(fake.ask(fake.add_attachment(png_bytes()), "What is this?"))
                await fake.wait_for(lambda: interaction.original_id and
                                    fake.messages[interaction.original_id].content == backend.answer)  # fmt: skip
                signal.raise_signal(signal.SIGINT)
                return await asyncio.wait_for(task, 20)
        finally:
            await fake.close()

    assert asyncio.run(main()) == 0
    assert "Discord: gateway connected" in caplog.text and "stopped" in caplog.text


def test_discord_serve_stops_with_one_line_for_a_rejected_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _scripted_backends(monkeypatch)
    settings = Settings.model_validate({"data_dir": str(tmp_path / "data"), "discord": {"enabled": True}})

    async def main() -> int:
        fake = await FakeDiscord().start()
        try:
            async with fake.routed():
                monkeypatch.setenv("DISCORD_BOT_TOKEN", "not.the.token")
                return await serve.run_bot(settings, terminal=False, only={"discord"})
        finally:
            await fake.close()

    assert asyncio.run(main()) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "discord: Discord rejected DISCORD_BOT_TOKEN (401 Unauthorized): copy a new token from the Developer Portal "
        "(https://discord.com/developers/applications) → your application → Bot → Reset Token (see docs/discord.md)"
    ]


def test_discord_command_comparison_ignores_what_discord_adds() -> None:
    local = [{
        "name": "ask", "description": "Ask", "type": 1, "nsfw": False, "dm_permission": True,
        "default_member_permissions": None, "contexts": None, "integration_types": None,
        "options": [{"type": 11, "name": "image", "description": "The picture", "required": True},
                    {"type": 3, "name": "preset", "description": "A preset", "required": False,
                     "choices": [{"name": "describe — Describe it", "value": "describe"}]}],
    }]  # fmt: skip
    remote = [{
        "id": "1", "application_id": "2", "version": "3", "type": 1, "name": "ask", "description": "Ask",
        "default_member_permissions": None, "nsfw": False, "contexts": [0, 1, 2], "integration_types": [0],
        "name_localizations": {}, "description_localizations": {},
        "options": [{"type": 11, "name": "image", "description": "The picture", "required": True, "choices": [],
                     "channel_types": [], "min_value": None, "max_value": None, "min_length": None,
                     "max_length": None, "autocomplete": False, "options": [], "name_localizations": {}},
                    {"type": 3, "name": "preset", "description": "A preset",
                     "choices": [{"name": "describe — Describe it", "value": "describe"}]}],
    }]  # fmt: skip
    assert differences(local, remote) == []
    changed = [dict(remote[0], options=[remote[0]["options"][0]])]
    assert differences(local, changed) == ["ask"]
    assert differences(local, [*remote, {"name": "old"}]) == ["old"]
    assert differences(local, []) == ["ask"]


def test_discord_front_end_is_built_by_its_plugin() -> None:
    adapter = FRONT_END.create(_NoCore(), DiscordSettings(), FrontEndContext())  # type: ignore[arg-type]
    assert isinstance(adapter, DiscordFrontEnd)
    assert asyncio.run(adapter.problem()) == "Discord: not started"
