"""Slack as a plugin: registered under ``minigpt4_bot.frontends``, ``[slack]`` validated by its own settings
model, started by ``run_bot`` from ``[slack]`` + environment tokens, refusing clearly (without echoing
secrets) when a token is missing or rejected."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_slack import FakeSlack
from slack_helpers import CHANNEL, make_settings, png_bytes

from adapters.slack import FRONT_END, SlackSettings
from adapters.slack.app import SlackFrontEnd, SlackTokens
from adapters.slack.messages import PLACEHOLDER, SUFFIX
from bot.cli.serve import run_bot
from bot.core.config import Settings
from bot.core.frontend_api import FrontEndContext, FrontEndSetupError
from bot.core.plugins import FRONTENDS, load_plugin, plugin_names

ROOT = Path(__file__).resolve().parents[2]


def test_tokens_come_from_the_environment_and_are_never_shown():
    env = {"SLACK_BOT_TOKEN": "xoxb-secret-1", "SLACK_APP_TOKEN": "xapp-secret-2", "SLACK_SIGNING_SECRET": "s3"}
    tokens = SlackTokens.from_env("socket", env)
    assert (tokens.bot, tokens.app) == ("xoxb-secret-1", "xapp-secret-2")
    assert "secret" not in repr(tokens) and "s3" not in repr(tokens)
    with pytest.raises(FrontEndSetupError, match="SLACK_BOT_TOKEN and SLACK_APP_TOKEN"):
        SlackTokens.from_env("socket", {})
    with pytest.raises(FrontEndSetupError, match="SLACK_SIGNING_SECRET") as info:
        SlackTokens.from_env("http", {"SLACK_BOT_TOKEN": "xoxb-secret-1"})
    assert "secret-1" not in str(info.value)
    with pytest.raises(FrontEndSetupError, match="xapp-"):
        SlackTokens.from_env("socket", env | {"SLACK_APP_TOKEN": "xoxb-wrong-kind"})


def test_slack_settings_are_validated():
    slack = SlackSettings.model_validate({"api_url": "https://slack-gov.com/api"})
    assert slack.api_url == "https://slack-gov.com/api/" and slack.mode == "socket" and not slack.enabled
    for bad in ({"mode": "rtm"}, {"api_url": "slack.com"}, {"slash_command": "minigpt4"}, {"updates_per_minute": 0},
                {"tokens": "xoxb-never-here"}):  # fmt: skip
        with pytest.raises(ValueError):
            SlackSettings.model_validate(bad)
    table = Settings.model_validate({"slack": {"enabled": True, "mode": "http"}}).frontend("slack")
    assert isinstance(table, SlackSettings) and table.enabled and table.mode == "http"


def test_slack_is_a_registered_front_end_plugin():
    assert "slack" in plugin_names(FRONTENDS)
    plugin = load_plugin(FRONTENDS, "slack")
    assert plugin is FRONT_END and plugin.name == "slack" and plugin.settings is SlackSettings
    assert plugin.docs == "docs/slack.md" and (ROOT / plugin.docs).is_file()
    assert not plugin.enabled(SlackSettings(), FrontEndContext()) and plugin.enabled(SlackSettings(enabled=True),
                                                                                    FrontEndContext())  # fmt: skip
    front_end = plugin.create(object(), SlackSettings(), FrontEndContext())  # building it does nothing yet
    assert isinstance(front_end, SlackFrontEnd) and front_end.name == "slack"


def test_start_refuses_missing_or_rejected_tokens_without_showing_them() -> None:
    async def main() -> None:
        fake = await FakeSlack().start()
        try:
            settings = SlackSettings(api_url=fake.api_url)
            front_end = SlackFrontEnd(object(), settings, environ={"SLACK_BOT_TOKEN": "xoxb-secret-1"})  # type: ignore[arg-type]
            with pytest.raises(FrontEndSetupError, match="SLACK_APP_TOKEN") as missing:
                await front_end.start()
            assert "secret-1" not in str(missing.value)
            wrong = {"SLACK_BOT_TOKEN": "xoxb-revoked", "SLACK_APP_TOKEN": fake.app_token}
            front_end = SlackFrontEnd(object(), settings, environ=wrong)  # type: ignore[arg-type]
            with pytest.raises(FrontEndSetupError, match="Slack rejected SLACK_BOT_TOKEN: invalid_auth") as rejected:
                await front_end.start()
            assert "OAuth & Permissions" in str(rejected.value) and "revoked" not in str(rejected.value)
            assert front_end.http is None and fake.connections == 0  # cleaned up, never connected
            await front_end.stop()  # stopping twice is harmless
        finally:
            await fake.close()

    asyncio.run(main())


def _serve_settings(tmp_path: Path, api_url: str) -> Settings:
    settings = make_settings(slack={"enabled": True, "api_url": api_url}, web={"enabled": False})
    settings.data_dir = str(tmp_path / "data")
    return settings


def test_run_bot_starts_socket_mode_and_answers(demo_models: Any, tmp_path: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        fake = await FakeSlack().start()
        monkeypatch.setenv("SLACK_BOT_TOKEN", fake.bot_token)
        monkeypatch.setenv("SLACK_APP_TOKEN", fake.app_token)
        bot = asyncio.create_task(run_bot(_serve_settings(tmp_path, fake.api_url), terminal=False,
                                          model=demo_models["vicuna0"]))  # fmt: skip
        try:
            await asyncio.wait_for(fake.wait_connected(), 60)
            mention = fake.picture_mention(png_bytes())
            await fake.send_event(mention)

            def answered() -> bool:
                replies = fake.bot_replies(CHANNEL, mention["ts"])
                return bool(replies) and replies[0].text != PLACEHOLDER and not replies[0].text.endswith(SUFFIX)

            await fake.wait_for(answered, 30)
        finally:
            bot.cancel()
            await asyncio.gather(bot, return_exceptions=True)
            await fake.close()
        assert bot.cancelled()

    asyncio.run(main())
    assert "stopped" in caplog.text
    assert "xoxb-fake-bot" not in caplog.text and "xapp-fake-app" not in caplog.text


def test_run_bot_refuses_to_start_slack_without_tokens(demo_models: Any, tmp_path: Path, monkeypatch, caplog) -> None:
    for name in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-do-not-print")
    settings = _serve_settings(tmp_path, "http://127.0.0.1:9/api/")
    asyncio.run(asyncio.wait_for(run_bot(settings, terminal=False, model=demo_models["vicuna0"]), 60))
    assert "SLACK_APP_TOKEN" in caplog.text and "docs/slack.md" in caplog.text
    assert "xoxb-do-not-print" not in caplog.text


def test_the_core_and_terminal_do_not_load_slack():
    code = (
        "import sys, bot.cli.serve, bot.core.config, bot.cli.main, adapters.terminal, adapters.web, adapters.slack\n"
        "from bot.core.plugins import FRONTENDS, load_plugin\n"
        "assert load_plugin(FRONTENDS, 'slack').settings.__name__ == 'SlackSettings'  # the table, without bolt\n"
        "assert not [m for m in sys.modules if m.startswith(('slack_bolt', 'slack_sdk'))]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_manifest_matches_what_the_adapter_needs():
    import yaml

    manifest = yaml.safe_load((ROOT / "adapters" / "slack_manifest.yaml").read_text(encoding="utf-8"))
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert scopes == {"app_mentions:read", "chat:write", "files:read", "files:write", "im:history", "channels:history",
                      "groups:history", "commands"}  # fmt: skip
    events = set(manifest["settings"]["event_subscriptions"]["bot_events"])
    assert events == {"app_mention", "message.im", "message.channels", "message.groups"}
    assert manifest["settings"]["socket_mode_enabled"] is True
    (command,) = manifest["features"]["slash_commands"]
    assert command["command"] == SlackSettings().slash_command
    assert manifest["features"]["app_home"]["messages_tab_enabled"] is True
