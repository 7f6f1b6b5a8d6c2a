"""The chain: a request's :class:`Context`, the :class:`Parts` every step may use, the :class:`Step`
protocol and :func:`chain`, which links steps into one handler (see the package docstring)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.core.access import AccessControl
from bot.core.backend_api import ChatTurn, GenerationBackend
from bot.core.commands import ParsedMessage
from bot.core.config import Settings
from bot.core.metrics import BotMetrics
from bot.core.presets import PresetBook
from bot.core.previews import WebsitePreviews
from bot.core.quotas import QuotaPolicy
from bot.core.requests import ReplyEvent, Request, ThreadRef
from bot.core.workers import WorkerIdentity
from model.engine.contract import FinalEvent
from storage import Database

__all__ = ["Context", "Handler", "Parts", "Step", "Streamed", "Timing", "chain", "log"]

log = logging.getLogger("bot.core.service")
"""One logger for the whole request path (the service and its steps), so a log filter on
``bot.core.service`` keeps catching every line it caught before the path was split into steps."""


class Timing:
    """The request path's timings (the :class:`~bot.core.service.BotService` class attributes of the same
    names, read at each request, so a test or an operator may tune them on the class or the instance)."""

    STORE_RETRY_DELAYS_S: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    """Waits between the tries of an answer's final write (6 tries over ~8 s): the user has seen the answer."""
    PARTIAL_SAVE_S = 1.0
    """How often the text of an answer being streamed is stored (one small UPDATE, in the background): a
    kill -9 mid-answer loses at most about this much of what the user saw.  Not a setting: a second is
    cheap for the database at any load the engine can stream, and short next to any answer worth keeping."""


@dataclass
class Parts:
    """What the steps share: the settings, the database, the backend and the core's helpers.  One per
    :class:`~bot.core.service.BotService`; a step's unit test builds one with a scripted backend and a
    real SQLite :class:`~storage.Database`."""

    settings: Settings
    db: Database
    backend: GenerationBackend
    metrics: BotMetrics
    presets: PresetBook
    quotas: QuotaPolicy
    access: AccessControl
    previews: WebsitePreviews
    worker: WorkerIdentity
    timing: Any = field(default_factory=Timing)  # has STORE_RETRY_DELAYS_S and PARTIAL_SAVE_S (Timing's)
    writes: set[asyncio.Task[bool]] = field(default_factory=set)  # final writes that outlive a cancelled request

    @classmethod
    def build(
        cls, settings: Settings, db: Database, backend: GenerationBackend, *, metrics: BotMetrics | None = None,
        previews: WebsitePreviews | None = None, worker: WorkerIdentity | None = None, timing: Any = None,
    ) -> Parts:  # fmt: skip
        """The parts from the settings (what :class:`~bot.core.service.BotService` and the step tests use)."""
        metrics = metrics or BotMetrics()
        return cls(
            settings=settings, db=db, backend=backend, metrics=metrics,
            presets=PresetBook(settings.presets, settings.model.variant),  # + MiniGPT-v2's tasks for minigptv2
            quotas=QuotaPolicy(settings.quotas, db), access=AccessControl(db),
            previews=previews or WebsitePreviews(settings.render, metrics, None, settings.grounding),
            worker=worker or WorkerIdentity.this_process(), timing=timing or Timing(),
        )  # fmt: skip


@dataclass
class Streamed:
    """What the backend streamed (the stream step writes it, the store step stores it): the token texts,
    its final event, how many tokens (what an interrupted answer is charged), when it started, and what
    the ``error`` column keeps of a failure."""

    started: float = field(default_factory=time.monotonic)
    parts: list[str] = field(default_factory=list)
    final: FinalEvent | None = None
    generated: int = 0
    error: str | None = None


@dataclass
class Context:
    """One request on its way down the chain: the request (cleaned), and what each step found for the next.

    ``outcome`` is the request's metrics label (``answered`` unless a step says otherwise: ``duplicate``).
    ``usage_id`` is the quota reservation; ``answer_turn`` the pending answer row, once stored (the quota
    step gives the reservation back when the request fails before it).
    """

    request: Request
    outcome: str = "answered"
    parsed: ParsedMessage = field(default_factory=ParsedMessage)
    options: dict[str, Any] = field(default_factory=dict)
    conversation: Any = None  # the live conversation row, or None
    history: list[Any] = field(default_factory=list)  # its stored turns (empty for a seeded request)
    checked: list[Any] = field(default_factory=list)  # the message's pictures, decoded and checked
    seeded: list[tuple[Any, list[Any]]] | None = None  # Request.history with each turn's checked pictures
    question: str = ""
    usage_id: int | None = None
    answer_turn: int | None = None  # the pending answer's turn id
    turns: list[ChatTurn] = field(default_factory=list)  # what the model reads
    images: list[bytes] = field(default_factory=list)
    told_cut: bool = False  # an earlier answer of the thread was cut (its note was shown)
    streamed: Streamed = field(default_factory=Streamed)

    @property
    def key(self) -> ThreadRef:
        return self.request.ref

    @property
    def seeded_images(self) -> list[Any]:
        return [c for _turn, pictures in self.seeded or () for c in pictures]


Handler = Callable[[Context], AsyncGenerator[ReplyEvent, None]]
"""The rest of the chain, as a step sees it: call it with the context and relay what it yields."""


class Step(Protocol):
    """One concern of the request path, bolt-middleware style: an async generator that does its part, then
    either answers (yields a ``Final``, or raises a :class:`~bot.core.errors.BotError`) or passes the request
    on, relaying what the rest yields::

        async with aclosing(call_next(ctx)) as events:  # closed with this step: a reply closed early
            async for event in events:                    # closes the whole chain now, down to the backend
                yield event

    and handling what comes back if it must (the quota step gives the reservation back when a later step
    fails; the store step writes the answer the stream step streamed)."""

    def __call__(self, ctx: Context, call_next: Handler) -> AsyncGenerator[ReplyEvent, None]: ...


async def _end(_ctx: Context) -> AsyncGenerator[ReplyEvent, None]:
    return
    yield  # pragma: no cover - an async generator that yields nothing


def chain(steps: Sequence[Step]) -> Handler:
    """The handler that runs ``steps`` in order, each one given the rest as ``call_next``."""
    handler: Handler = _end
    for step in reversed(steps):
        handler = _link(step, handler)
    return handler


def _link(step: Step, call_next: Handler) -> Handler:
    def run(ctx: Context) -> AsyncGenerator[ReplyEvent, None]:
        return step(ctx, call_next)

    return run
