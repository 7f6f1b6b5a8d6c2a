"""``[discord]`` in ``bot.toml``: the Discord front end's settings (the token comes from the environment only)."""

from __future__ import annotations

from pydantic import Field, field_validator

from adapters.shared_settings import ChatPlatformSettings

__all__ = ["MESSAGE_LIMIT", "DiscordSettings"]

MESSAGE_LIMIT = 2000  # Discord's limit on a message's content


class DiscordSettings(ChatPlatformSettings):
    """``[discord]``: the Discord front end (``DISCORD_BOT_TOKEN`` comes from the environment only); ``enabled``
    and ``max_image_bytes`` are every chat platform's (:class:`ChatPlatformSettings`)."""

    guild_ids: list[int] = Field(default_factory=list, description="[] = global slash commands")
    update_interval_s: float = Field(1.0, ge=1.0, description="at least this long between two edits (Discord's rate)")
    max_message_chars: int = Field(MESSAGE_LIMIT, ge=200, le=MESSAGE_LIMIT)

    @field_validator("guild_ids")
    @classmethod
    def _guild_ids(cls, value: list[int]) -> list[int]:
        if any(g <= 0 for g in value):
            raise ValueError(
                "guild ids are Discord server ids (Developer Mode → right-click the server → Copy Server ID)"
            )
        return list(dict.fromkeys(value))
