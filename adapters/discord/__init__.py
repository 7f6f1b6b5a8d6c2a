"""The Discord front end, registered as ``discord`` in the ``minigpt4_bot.frontends`` entry-point group.

Modules by job, like the Slack front end: :mod:`~adapters.discord.app` (the discord.py client, its listeners
and lifecycle), :mod:`~adapters.discord.commands` (the slash commands and their sync-only-when-changed),
:mod:`~adapters.discord.files` (attachment downloads and checks), :mod:`~adapters.discord.messages` (mentions,
the calls every reply makes, Discord's editable messages for channel messages),
:mod:`~adapters.discord.interaction_reply` (those of interaction responses) and
:mod:`~adapters.discord.settings` (``[discord]`` in ``bot.toml``).  Importing this package loads only the
settings: discord.py is imported when the front end is created.  Set-up: ``docs/discord.md``.
"""

from __future__ import annotations

from adapters.discord.settings import DiscordSettings
from bot.core.frontend_api import Core, FrontEnd, FrontEndContext, FrontEndPlugin, FrontEndSetupError

__all__ = ["FRONT_END", "DiscordSettings", "create"]


def create(core: Core, settings: DiscordSettings, context: FrontEndContext) -> FrontEnd:
    """The Discord front end on ``core`` (not started: ``start`` reads ``DISCORD_BOT_TOKEN`` and connects)."""
    from adapters.discord.app import DiscordFrontEnd

    return DiscordFrontEnd(core, settings)


def check(settings: DiscordSettings) -> str | None:
    """``DISCORD_BOT_TOKEN`` in the environment, looked at before ``serve`` loads the model."""
    from adapters.discord.app import DiscordToken

    try:
        DiscordToken.from_env()
    except FrontEndSetupError as exc:
        return str(exc)
    return None


FRONT_END = FrontEndPlugin(name="discord", settings=DiscordSettings, create=create, check=check, docs="docs/discord.md")
