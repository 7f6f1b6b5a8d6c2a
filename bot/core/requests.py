"""Platform-neutral requests and the reply events adapters render."""

from __future__ import annotations

import functools
import logging
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Delta",
    "Final",
    "FinalKind",
    "ImageAttachment",
    "ReplyEvent",
    "ReplyFile",
    "Request",
    "ThreadRef",
    "normalize_id",
    "normalize_user",
    "user_ids_fold_case",
]

log = logging.getLogger(__name__)

FinalKind = Literal["answer", "help", "notice", "error"]


def normalize_id(value: str, *, fold_case: bool = False) -> str:
    """One spelling per id, so quotas, access rules and stored rows cannot be dodged by writing an id another
    way: NFKC (full-width ``Ｑ１`` is ``Q1``), format characters (Unicode category Cf: zero-width space and
    joiners, bidi marks, soft hyphen) removed, whitespace runs as one space, no space at the ends; with
    ``fold_case``, case-folded too (NFKC again after folding, as Unicode's NFKC_Casefold).  Idempotent."""
    text = unicodedata.normalize("NFKC", value)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    text = " ".join(text.split())
    return unicodedata.normalize("NFKC", text.casefold()) if fold_case else text


def normalize_user(platform: str, user: str) -> str:
    """A user id as the core keeps it: :func:`normalize_id`, case-folded where :func:`user_ids_fold_case`."""
    return normalize_id(user, fold_case=user_ids_fold_case(platform))


@functools.cache
def user_ids_fold_case(platform: str) -> bool:
    """Whether ``platform``'s user ids are names, case-folded so that ``Q1`` and ``q1`` are one person.

    The front end says so itself (``FrontEndPlugin.case_insensitive_users``: an auth proxy's login, an
    account name), so the core names no platform; chat platforms' ids (``U012AB3CD``, snowflakes) are
    opaque and compared exactly, and so is a platform no installed front end is called.  Requests, access
    rules and ``admin quota`` all spell users through here.
    """
    from bot.core.plugins import FRONTENDS, UnknownPlugin, load_plugin

    try:
        plugin = load_plugin(FRONTENDS, platform)
    except UnknownPlugin:
        return False
    except Exception as exc:  # a front end that cannot be imported here: its ids are kept as they are
        log.warning("front end %r could not be loaded (%s): its user ids are compared exactly", platform, exc)
        return False
    return bool(getattr(plugin, "case_insensitive_users", False))


def _normalize_place(obj: Any) -> None:
    """Normalise ``workspace``, ``channel`` and ``thread`` of a frozen ref or request in place (construction)."""
    for name in ("workspace", "channel", "thread"):
        object.__setattr__(obj, name, normalize_id(getattr(obj, name)))


@dataclass(frozen=True)
class ThreadRef:
    """Identifies a thread on a platform: the conversation key every front end uses (ids normalised as
    :class:`Request`'s, so a lookup finds what a request stored)."""

    platform: str
    workspace: str
    channel: str
    thread: str

    def __post_init__(self) -> None:
        _normalize_place(self)


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

    Ids are normalised on construction (:func:`normalize_id`; the user with :func:`normalize_user`), so
    every front end's ``Q1``, ``q1`` and ``q1`` + zero-width space reach quotas and access rules as one id.
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

    def __post_init__(self) -> None:
        _normalize_place(self)
        object.__setattr__(self, "user", normalize_user(self.platform, self.user))
        object.__setattr__(self, "roles", tuple(normalize_id(r) for r in self.roles))

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
