"""Every Discord test leaves discord.py pointed at Discord again (the fake is reached through two class attributes)."""

from __future__ import annotations

from collections.abc import Iterator

import discord.gateway
import discord.http
import pytest


@pytest.fixture(autouse=True)
def _discord_endpoints_restored() -> Iterator[None]:
    before = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    yield
    after = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    assert after == before, "a test left discord.py pointed at a fake Discord"
    assert discord.http.Route.BASE.startswith("https://discord.com/api/")
