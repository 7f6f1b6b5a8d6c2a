"""The settings fields front ends share are declared once (issue 22 item 4), with the same bounds as before."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from adapters.discord.settings import DiscordSettings
from adapters.openai_api import OpenAISettings
from adapters.shared_settings import ChatPlatformSettings, ServerSettings
from adapters.slack.settings import SlackSettings
from adapters.web.settings import WebSettings


@pytest.mark.parametrize("table", [SlackSettings, DiscordSettings])
def test_chat_platforms_share_one_base(table: type[ChatPlatformSettings]) -> None:
    assert issubclass(table, ChatPlatformSettings)
    assert "max_image_bytes" not in vars(table)["__annotations__"]  # inherited, not redeclared
    assert table().enabled is False and table().max_image_bytes == 0 and table().update_interval_s == 1.0
    with pytest.raises(ValidationError):
        table(max_image_bytes=-1)


def test_discord_narrows_the_edit_interval_slack_does_not() -> None:
    assert SlackSettings(update_interval_s=0).update_interval_s == 0
    with pytest.raises(ValidationError):
        DiscordSettings(update_interval_s=0.5)


@pytest.mark.parametrize(("table", "port", "enabled"), [(WebSettings, 8080, True), (OpenAISettings, 8081, False)])
def test_servers_share_host_and_port(table: type[ServerSettings], port: int, enabled: bool) -> None:
    assert issubclass(table, ServerSettings)
    assert (table().host, table().port, table().enabled) == ("127.0.0.1", port, enabled)
    for bad in (-1, 65536):
        with pytest.raises(ValidationError):
            table(port=bad)
    assert table(port=0).port == 0
