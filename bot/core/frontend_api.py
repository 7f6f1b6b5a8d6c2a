"""The front-end seam: what a front end gets from the core (:class:`Core`) and what it gives (:class:`FrontEnd`).

In the style of vLLM's ``SchedulerInterface``: two small Protocols and the value types that cross
them, nothing else.  A front end (web chat, terminal, Slack, Discord …) is one module that

1. declares a :class:`FrontEndPlugin` — its name, its ``bot.toml`` table (a pydantic model derived from
   :class:`FrontEndSettings`) and a factory — registered under the entry-point group
   ``minigpt4_bot.frontends`` (see ``pyproject.toml``), so ``serve`` starts whatever ``bot.toml``
   enables without the core naming any platform;
2. turns platform events into :class:`~bot.core.requests.Request` values, passes them to
   :meth:`Core.handle` and renders the :data:`~bot.core.requests.ReplyEvent` stream back;
3. uses nothing of the core but :class:`Core`: never the database, the model backend or ``storage``.

``docs/adapters.md`` walks through the web chat as the worked example.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict
from typing_extensions import TypeVar

from bot.core.requests import ReplyEvent, ReplyFile, Request, ThreadRef

__all__ = [
    "ApiKeyOwner",
    "Core",
    "FrontEnd",
    "FrontEndContext",
    "FrontEndPlugin",
    "FrontEndSettings",
    "FrontEndSetupError",
    "GenerationDefaults",
    "Health",
    "ImageLimits",
    "PresetInfo",
    "ThreadRef",
    "ThreadTurn",
    "ThreadView",
]

FRONTENDS_GROUP = "minigpt4_bot.frontends"


# ----------------------------------------------------------------------------- values crossing the seam


@dataclass(frozen=True)
class ThreadTurn:
    """One stored message of a thread, as a front end may show it (history views)."""

    id: int
    role: Literal["user", "assistant"]
    text: str
    status: str  # pending | streaming | done | failed | interrupted; a user turn: done | retried (asked again)
    has_image: bool
    created_at: datetime | None
    image_sha256: str = ""  # the picture's SHA-256 (hex), "" without one: a client's copy can be matched to it


@dataclass(frozen=True)
class ThreadView:
    """What the core knows about a thread.

    ``live``: it has a live conversation with at least one turn — messages in it are follow-ups and
    need no mention.  ``followed``: the bot was addressed in it at some point (a mention, a ``reset``),
    kept in SQL so a picture posted there later (also after a restart) starts the conversation.
    ``started_by``: the user (as stored: normalised) of the live conversation's first message, "" when it
    has none — a front end whose thread ids alone would grant access (the web chat behind a login proxy)
    shows a thread only to that user.
    """

    ref: ThreadRef
    live: bool
    followed: bool
    has_image: bool = False
    turns: tuple[ThreadTurn, ...] = ()
    started_by: str = ""


@dataclass(frozen=True)
class PresetInfo:
    """A preset as it applies in one workspace and channel (overrides resolved)."""

    name: str
    prompt: str


@dataclass(frozen=True)
class ImageLimits:
    """What pictures the core accepts; front ends check sizes before downloading and name the formats
    from here (``formats``: the names users know, e.g. ``("JPEG", "PNG", …, "HEIC")``), never a list of
    their own, so a message or a command's description lists exactly what the core reads."""

    max_bytes: int
    max_pixels: int
    max_per_message: int
    formats: tuple[str, ...] = ()

    def formats_text(self, conjunction: str = "or") -> str:
        """The formats for a sentence: ``"JPEG, PNG, GIF, WebP, BMP or HEIC"`` (``"and"``: "I read … and …");
        ``"any picture"`` when none are named."""
        *most, last = self.formats or ("any picture",)
        return f"{', '.join(most)} {conjunction} {last}" if most else last


@dataclass(frozen=True)
class GenerationDefaults:
    """The ``[generation]`` settings a front end may show or offer: the answer length (also the most a
    request may ask for), the context length the model reads, and the sampling defaults."""

    max_new_tokens: int
    max_length: int
    temperature: float
    top_p: float
    do_sample: bool


@dataclass(frozen=True)
class ApiKeyOwner:
    """Whom a valid API key stands for (:meth:`Core.verify_api_key`): a user of a workspace on the key's
    platform, so quotas, access rules and usage apply to them as to any platform's user.  ``key_id`` is the
    key's public id (safe to log and to use in thread ids); the secret is never handed out."""

    key_id: str
    user: str
    workspace: str


@dataclass(frozen=True)
class Health:
    """Liveness (:meth:`Core.health`) or readiness (:meth:`Core.readiness`) facts for ``/healthz`` and
    ``/readyz``-style endpoints: ``ok`` = every check passed; ``checks`` names each one."""

    ok: bool
    model: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)  # name → "ok" or a one-line problem


# ----------------------------------------------------------------------------- what the core gives


@runtime_checkable
class Core(Protocol):
    """The whole API a front end may use.  :class:`bot.core.service.BotService` implements it."""

    def handle(self, request: Request) -> AsyncGenerator[ReplyEvent, None]:
        """Answer one message: streamed :class:`~bot.core.requests.Delta` values, then one ``Final``.

        Yields nothing for a redelivered ``event_id``.  Never raises for bad input, quotas, access or
        model failures: those arrive as a ``Final`` whose ``kind`` says which.  Closing the iterator
        early (the user left) interrupts the answer; what was stored is kept.
        """
        ...

    async def seen_event(self, platform: str, event_id: str) -> bool:
        """Whether :meth:`handle` would drop ``event_id`` as a redelivery, asked before fetching what the
        request needs (a platform's files): a read, nothing recorded.  ``handle`` still decides — two
        deliveries at the same moment may both get ``False``.  ``False`` when it cannot tell (a database
        outage: ``handle`` then answers with the error)."""
        ...

    async def thread(self, ref: ThreadRef, *, turns: bool = False) -> ThreadView:
        """The thread's state (and its stored turns when ``turns``), for follow-up detection and history."""
        ...

    async def thread_image(self, ref: ThreadRef, turn_id: int) -> ReplyFile | None:
        """The picture sent with user turn ``turn_id`` of the thread's live conversation (a history view
        shows it again); ``None`` when that turn is not in this thread or has none."""
        ...

    def presets(self, workspace: str = "", channel: str = "") -> list[PresetInfo]:
        """The presets a user can pick here, in their configured order."""
        ...

    @property
    def default_preset(self) -> str:
        """The preset a bare picture gets ("" = none)."""
        ...

    def help_text(self) -> str:
        """Platform-neutral help (plain text; front ends may add their own lines around it)."""
        ...

    @property
    def image_limits(self) -> ImageLimits: ...

    @property
    def generation_defaults(self) -> GenerationDefaults:
        """``[generation]``'s answer length, context length and sampling defaults (bounds for
        :class:`~bot.core.requests.GenerationRequest`)."""
        ...

    async def verify_api_key(self, platform: str, key: str) -> ApiKeyOwner | None:
        """Whom ``key`` (made by ``minigpt4-bot admin keys create``) stands for on ``platform``, or ``None``
        for a malformed, unknown, revoked or other platform's key.  Hashes are compared in constant time and
        the key's last use is recorded; the key is never logged.  Raises only when the database cannot be
        asked (the front end answers "try again", not "bad key")."""
        ...

    async def health(self) -> Health:
        """Liveness, cheap: the process answers and the model backend describes itself (no database)."""
        ...

    async def readiness(self) -> Health:
        """Readiness, checked now: ``database`` (``SELECT 1`` with a short timeout), ``engine`` and each
        running front end's :meth:`FrontEnd.problem` under its name.  Not ready = send no traffic here."""
        ...

    def metrics_text(self) -> bytes:
        """Prometheus text exposition of the bot's and the engine's metrics."""
        ...


# ----------------------------------------------------------------------------- what a front end gives


class FrontEndSetupError(RuntimeError):
    """A front end cannot start (a missing or rejected token, a missing permission, an unreachable server).

    The message is one line saying what is wrong and where to fix it; ``serve`` prints it and stops.
    """


@runtime_checkable
class FrontEnd(Protocol):
    """A running front end: ``start`` returns once it is serving (or raises
    :class:`FrontEndSetupError`); ``stop`` ends it and interrupts answers in flight."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def problem(self) -> str | None:
        """``None`` while serving normally, else one line for readiness checks (e.g. "gateway disconnected").

        Cheap and quick (it runs on every readiness probe): report the state the front end already
        tracks — a listening server, a connected gateway — rather than calling the platform.
        """
        ...


Enabled = TypeVar("Enabled", default=bool)  # what a table's ``enabled`` holds: on/off, unless a front end says more


class FrontEndSettings(BaseModel, Generic[Enabled]):
    """Base of a front end's ``bot.toml`` table: every front end has ``enabled``; unknown keys are errors.

    ``enabled`` is a bool unless the front end's plugin decides more (its ``enabled`` callable): the terminal's
    table is ``FrontEndSettings[bool | Literal["auto"]]``.  Off (``False``, the default) is always valid.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: Enabled | Literal[False] = False


@dataclass(frozen=True)
class FrontEndContext:
    """What ``serve`` hands a front end besides the core.

    ``interactive``: the process runs in a terminal.  ``request_stop``: the front end's user asked to
    end the bot (e.g. quitting the terminal chat); ``serve`` stops when no other front end is running.
    ``data_dir``: where a front end may keep files (saved attachments, a command-sync hash).
    """

    interactive: bool = False
    request_stop: Callable[[str], None] = lambda _name: None
    data_dir: Path = Path("data")  # the bot's data folder ([data_dir]): files a front end keeps go below it


@dataclass(frozen=True)
class FrontEndPlugin:
    """The entry-point object a front end module exports: name, settings table and factory.

    ``create(core, settings, context)`` builds the front end without starting it; ``enabled(settings,
    context)`` decides whether ``serve`` starts it (default: the table's ``enabled``).  ``check(settings)``
    is a quick look, with no network, at what the front end needs from its surroundings (tokens in the
    environment): a one-line problem or None; ``serve`` asks it before loading the model, so a missing
    token costs seconds, not a model load.  ``docs`` names the page with its set-up guide, quoted in
    start-up errors; ``start_order`` sorts the start.  ``case_insensitive_users``: the platform's user ids
    are names (an auth proxy's login, an account name), so ``Q1`` and ``q1`` are one person — the core then
    case-folds them in requests, access rules and quota overrides
    (:func:`~bot.core.requests.user_ids_fold_case`); opaque chat ids (Slack's, Discord's) keep their case.
    """

    name: str
    settings: type[FrontEndSettings[Any]]
    create: Callable[[Core, Any, FrontEndContext], FrontEnd]
    enabled: Callable[[Any, FrontEndContext], bool] = lambda settings, _context: bool(settings.enabled)
    check: Callable[[Any], str | None] = lambda _settings: None
    docs: str = "docs/adapters.md"
    start_order: int = 0  # lower starts first; an interactive prompt goes last, after the others' start-up lines
    case_insensitive_users: bool = False
