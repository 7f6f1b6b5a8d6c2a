"""Platform-neutral requests and the reply events adapters render."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Delta", "Final", "FinalKind", "ImageAttachment", "ReplyEvent", "ReplyFile", "Request", "ThreadRef"]

FinalKind = Literal["answer", "help", "notice", "error"]


@dataclass(frozen=True)
class ThreadRef:
    """Identifies a thread on a platform: the conversation key every front end uses."""

    platform: str
    workspace: str
    channel: str
    thread: str


@dataclass(frozen=True)
class ImageAttachment:
    """An image as the platform delivered it (bytes already downloaded).

    ``error`` (user-facing text) marks a picture the front end could not fetch — too large, not a
    picture, a download that failed.  The core answers it like any bad picture, after dropping a
    redelivered event, so a retry of the same message is never answered twice.
    """

    data: bytes
    filename: str = ""
    mime: str = ""
    error: str | None = None


@dataclass(frozen=True)
class Request:
    """One message to the bot.  ``thread`` is the thread root (a new message is its own root).

    ``addressed``: the user spoke to the bot directly (a mention, a slash command, a DM); the core
    then follows the thread, so later pictures there need no second mention (kept in SQL).

    ``roles``: the ids of the roles or groups the author has on the platform, where the platform has such
    a thing (Discord: the member's server role ids, without ``@everyone``); empty elsewhere (Slack, the web
    chat, the terminal) and in DMs.  Access rules with the ``role`` target match them.
    """

    platform: str
    workspace: str
    channel: str
    thread: str
    user: str
    text: str = ""
    images: tuple[ImageAttachment, ...] = ()
    event_id: str | None = None
    preset: str | None = None  # picked in a UI or slash command; the text may also name one
    addressed: bool = False
    roles: tuple[str, ...] = ()

    @property
    def ref(self) -> ThreadRef:
        return ThreadRef(self.platform, self.workspace, self.channel, self.thread)


@dataclass(frozen=True)
class Delta:
    """More answer text while the model streams."""

    text: str


@dataclass(frozen=True)
class ReplyFile:
    """A file that goes with a reply: a picture to show inline (``image/…``) or a document to download.

    Each front end shows it its own way (an upload into the thread, an attachment, an inline picture, a
    saved file); ``title`` is a short plain-text caption.
    """

    filename: str
    mime: str
    data: bytes = field(repr=False)
    title: str = ""

    @property
    def is_image(self) -> bool:
        return self.mime.startswith("image/")


@dataclass(frozen=True)
class Final:
    """A complete message: the full answer (replaces the streamed text) or a notice/help/error text.

    ``meta`` of an answer: ``tokens`` (completion tokens), ``turn_id`` (the stored answer) and ``context_cut``
    (the thread's oldest part was cut to fit ``max_length``; the first such answer of a thread says so).
    ``files``: what goes with it (e.g. the rendered preview and the page of a ``website`` answer).
    """

    text: str
    kind: FinalKind = "answer"
    ephemeral: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    files: tuple[ReplyFile, ...] = ()


ReplyEvent = Delta | Final
