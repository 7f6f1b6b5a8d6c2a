"""``[slack]`` in ``bot.toml``: the Slack front end's settings (tokens come from the environment, never from here)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from adapters.shared_settings import ChatPlatformSettings

__all__ = ["SlackSettings"]


class SlackSettings(ChatPlatformSettings):
    """``[slack]``: the Slack front end (tokens come from the environment, never from this file); ``enabled``,
    ``max_image_bytes`` and ``update_interval_s`` are every chat platform's (:class:`ChatPlatformSettings`)."""

    mode: Literal["socket", "http"] = "socket"
    api_url: str = "https://slack.com/api/"
    http_host: str = "127.0.0.1"
    http_port: int = Field(3000, ge=0, le=65535)
    slash_command: str = "/minigpt4"
    updates_per_minute: int = Field(45, ge=1, le=1000)
    max_message_chars: int = Field(3500, ge=200, le=4000)

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        value = value.strip()
        if not value.startswith(("https://", "http://")):
            raise ValueError(
                "use the Web API base URL, e.g. https://slack.com/api/ (GovSlack: https://slack-gov.com/api/)"
            )
        return value if value.endswith("/") else value + "/"

    @field_validator("slash_command")
    @classmethod
    def _slash_command(cls, value: str) -> str:
        if not value.startswith("/") or len(value) < 2 or any(c.isspace() or c.isupper() for c in value):
            raise ValueError("a slash command is '/' and a lowercase name without spaces, e.g. /minigpt4")
        return value
