"""The Discord front end, registered as ``discord`` in the ``minigpt4_bot.frontends`` entry-point group.

Modules by job, like the Slack front end: :mod:`~adapters.discord.app` (the discord.py client, its listeners
and lifecycle), :mod:`~adapters.discord.commands` (the slash commands and their sync-only-when-changed),
:mod:`~adapters.discord.files` (attachment downloads and checks), :mod:`~adapters.discord.render` (mentions,
Discord's editable messages for channel messages and interaction responses) and
:mod:`~adapters.discord.settings` (``[discord]`` in ``bot.toml``).  Importing this package loads only the
settings: discord.py is imported when the front end is created.  Set-up: ``docs/discord.md``.
"""

from __future__ import annotations

from adapters.discord.settings import DiscordSettings
from bot.core.api import Core, FrontEnd, FrontEndContext, FrontEndPlugin

__all__ = ["FRONT_END", "DiscordSettings", "create"]


def create(core: Core, settings: DiscordSettings, context: FrontEndContext) -> FrontEnd:
    """The Discord front end on ``core`` (not started: ``start`` reads ``DISCORD_BOT_TOKEN`` and connects)."""
    from adapters.discord.app import DiscordFrontEnd

    return DiscordFrontEnd(core, settings)


FRONT_END = FrontEndPlugin(name="discord", settings=DiscordSettings, create=create, docs="docs/discord.md")
