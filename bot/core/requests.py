"""Platform-neutral requests and the reply events adapters render."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Delta", "Final", "ImageAttachment", "ReplyEvent", "Request"]


@dataclass(frozen=True)
class ImageAttachment:
    """An image as the platform delivered it (bytes already downloaded)."""

    data: bytes
    filename: str = ""
    mime: str = ""


@dataclass(frozen=True)
class Request:
    """One message to the bot.  ``thread`` is the thread root (a new message is its own root)."""

    platform: str
    workspace: str
    channel: str
    thread: str
    user: str
    text: str = ""
    images: tuple[ImageAttachment, ...] = ()
    event_id: str | None = None
    preset: str | None = None  # picked in a UI or slash command; the text may also name one


@dataclass(frozen=True)
class Delta:
    """More answer text while the model streams."""

    text: str


@dataclass(frozen=True)
class Final:
    """A complete message: the full answer (replaces the streamed text) or a notice/help/error text."""

    text: str
    kind: str = "answer"  # answer | help | notice | error
    ephemeral: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


ReplyEvent = Delta | Final
