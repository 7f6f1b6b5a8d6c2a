"""The ``bot.toml`` fields that several front ends' tables share, declared once.

- :class:`ChatPlatformSettings` — every chat platform (``[slack]``, ``[discord]``, the next one): a chat
  front end streams an answer by editing a message and downloads the pictures users attach, so its table
  always has the same knobs.  A platform's own model (``adapters/<name>/settings.py``) derives from it and
  adds only what is its own (modes, command names, its message-length limit).
- :class:`ServerSettings` — every front end that is an HTTP server (``[web]``, ``[openai]``): ``host``
  and ``port``.

The keys and defaults are those ``bot.toml`` documents (``tests/test_config.py`` checks they agree).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from bot.core.frontend_api import FrontEndSettings

__all__ = ["ChatPlatformSettings", "Port", "ServerSettings"]

Port = Annotated[int, Field(ge=0, le=65535)]  # 0 = any free port (tests)


class ChatPlatformSettings(FrontEndSettings):
    """Base of a chat platform's table: off unless enabled; the picture size cap (which can only lower
    ``[images] max_bytes``, see :func:`adapters.downloads.size_cap`); the pace of a streaming answer's edits.

    A platform whose limits differ narrows a field by redeclaring it (Discord: ``update_interval_s >= 1``);
    ``max_message_chars`` is each platform's own, bounded by that platform's message limit.
    """

    enabled: bool = False
    max_image_bytes: int = Field(0, ge=0, description="0 = [images] max_bytes")
    update_interval_s: float = Field(1.0, ge=0, description="at least this long between two edits of a message")


class ServerSettings(FrontEndSettings):
    """Base of a server front end's table: it listens on ``host`` (loopback unless a proxy is put in front)
    and ``port``; each server names its own default port (``port: Port = 8080``)."""

    host: str = "127.0.0.1"
    port: Port = 0
