"""Platform-neutral requests and the reply events adapters render."""

from __future__ import annotations

import functools
import logging
import unicodedata
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from bot.core.sanitize import clean_text

__all__ = [
    "Command",
    "Delta",
    "Final",
    "FinalKind",
    "GenerationRequest",
    "HistoryTurn",
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


class Command(StrEnum):
    """A command a front end received from its platform's own command objects (:attr:`Request.command`);
    what each does, and the parser of commands written as text: :mod:`bot.core.commands`."""

    ASK = "ask"
    RESET = "reset"
    SETTINGS = "settings"
    HELP = "help"


def normalize_id(value: str, *, fold_case: bool = False) -> str:
    """One spelling per id, so quotas, access rules and stored rows cannot be dodged by writing an id another
    way: NFKC (full-width ``Ｑ１`` is ``Q1``), format characters (Unicode category Cf: zero-width space and
    joiners, bidi marks, soft hyphen) removed, whitespace runs as one space, no space at the ends; with
    ``fold_case``, case-folded too (NFKC again after folding, as Unicode's NFKC_Casefold).  Idempotent.

    It starts with :func:`~bot.core.sanitize.clean_text`, so a control character is dropped before whitespace
    is collapsed: ``"0\x1f0"`` is ``"00"`` whether a request, a :class:`ThreadRef` or a cleaned copy spells it
    (``str.split`` counts ``\x1c``-``\x1f`` as whitespace; clean_text drops them)."""
    text = unicodedata.normalize("NFKC", clean_text(value))
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
class GenerationRequest:
    """Answer options one request asks for (an HTTP API's ``max_tokens``, ``temperature`` …); ``None`` or
    empty = ``[generation]``'s setting.  The core checks them against ``[generation]``'s bounds before
    anything is stored or charged, and refuses a value out of range with a clear ``notice``
    (``meta["reason"] == "bad_input"``): ``max_new_tokens`` 1 … ``[generation] max_new_tokens``,
    ``temperature`` 0 … 5 (0 = greedy decoding, anything else samples), ``top_p`` in (0, 1], at most 4
    ``stop`` strings of 1 … 64 characters (added to the model's own), ``seed`` 0 … 2⁶³ − 1."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class HistoryTurn:
    """One earlier message of a conversation a front end brings along (:attr:`Request.history`): the user's
    words and pictures, or an answer the client was given."""

    role: Literal["user", "assistant"]
    text: str = ""
    images: tuple[ImageAttachment, ...] = ()


@dataclass(frozen=True)
class Request:
    """One message to the bot.  ``thread`` is the thread root (a new message is its own root).

    ``addressed``: the user spoke to the bot directly (a mention, a slash command, a DM); the core
    then follows the thread, so later pictures there need no second mention (kept in SQL).  A typed
    ``settings`` or ``help`` follows no thread, addressed or not.

    ``command``: the command the platform's own command objects delivered (:class:`~bot.core.commands.Command`:
    a Slack slash command, a Discord app command, the terminal's ``/reset``); the core then reads no command
    words in ``text`` (``ask``: the text is the question).  ``None``: a plain message, whose text may write a
    command (:func:`~bot.core.commands.parse_message`).  A command with no thread of its own (``settings`` or
    ``help`` from Slack's slash command, Discord's ``/settings`` outside a thread) sends ``thread=""``: the core
    reads no thread for those two; ``reset`` starts over the thread it names.

    ``roles``: the ids of the roles or groups the author has on the platform, where the platform has such
    a thing (Discord: the member's server role ids, without ``@everyone``); empty elsewhere (Slack, the web
    chat, the terminal) and in DMs.  Access rules with the ``role`` target match them.

    Ids are normalised on construction (:func:`normalize_id`; the user with :func:`normalize_user`), so
    every front end's ``Q1``, ``q1`` and ``q1`` + zero-width space reach quotas and access rules as one id.

    ``generation``: answer options this request asks for (:class:`GenerationRequest`; ``None`` = the
    ``[generation]`` settings).

    ``history``: for front ends whose clients send the whole conversation with each message (an HTTP API
    without server state).  ``None`` (every chat platform): the message continues the thread's stored
    conversation.  A tuple (maybe empty): the thread starts over, seeded with these earlier turns — its live
    conversation, if any, is archived (kept, as ``reset`` keeps it) and a new one stores the history, then this
    message.  Pictures in it are checked like new ones and count against the picture quota; a user turn's
    text may name a preset as a message does.  A front end sends it only when the client's history is not
    the stored one (edited, regenerated, or never seen): a follow-up on the stored conversation reuses the
    engine's cached image tokens and KV prefix, a seeded one cannot.

    ``event_id``: the platform's id of the event; a second request with the same id is a redelivery and is
    answered by nothing (unless the first one's answer failed or was interrupted: then it is answered).
    ``retry_refused``: a request refused before anything was stored (an access rule, a quota, a bad picture)
    gives its ``event_id`` back, so that the same id sent again is answered — for front ends whose clients
    retry on purpose (an API's ``Idempotency-Key``).  Chat platforms leave it off: their redeliveries of a
    refused message would post the refusal again.
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
    generation: GenerationRequest | None = None
    history: tuple[HistoryTurn, ...] | None = None
    command: Command | None = None
    retry_refused: bool = False

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
    (the thread's oldest part was cut to fit ``max_length``; the first such answer of a thread says so);
    ``prompt_tokens`` (what the model read), ``cached_prompt_tokens`` (the part of it the backend reused from
    its cache: the thread's earlier pictures and turns) and ``finish_reason`` (the backend's: ``eos``,
    ``stop``, ``length`` …) — a token usage report for APIs.
    ``meta`` of a refusal or failure (``kind`` ``error`` or ``notice`` from an error): ``reason`` — one of
    ``bad_input`` (the message or a picture), ``access_denied``, ``quota``, ``busy``, ``unsupported`` (the
    front end's ids), ``unavailable`` (the model or database failed) — so an API can pick its status code,
    and for ``quota`` and ``busy`` ``retry_after_s`` (seconds until the quota window resets; the backend's
    guess of when it has room).  Command replies (help, settings, reset) have no ``reason``.
    ``files``: what goes with it (e.g. the rendered preview and the page of a ``website`` answer).
    """

    text: str
    kind: FinalKind = "answer"
    ephemeral: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    files: tuple[ReplyFile, ...] = ()


ReplyEvent = Delta | Final
