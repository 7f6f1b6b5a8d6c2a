"""The bot core: one platform-neutral ``handle(request)`` that every adapter calls.

For each message, a chain of steps (:mod:`bot.core.pipeline`, one concern each): drop redeliveries (a
unique event id in SQL) → access rules → commands (``help``, ``reset``, ``settings``: :mod:`bot.core.commands`)
→ answer options → check new pictures → the thread's conversation → preset → quota (checked and the
request's usage reserved in one transaction) → store the user turn and a pending answer → stream the answer
from the backend → store it with its token counts, completing the usage reservation.  Errors become
:class:`~bot.core.requests.Final` replies with user-facing text; details go to the log.  A failed or
interrupted answer is marked as such and keeps the text streamed until then (stored about every second
while streaming, so a crash keeps most of it); no stored history is deleted (a failed answer only gives its
usage reservation back).  A retried event whose answer failed or was interrupted is answered again.

This module keeps the :class:`~bot.core.frontend_api.Core` surface and the lifecycle (``recover``,
``heartbeat``, ``prune_events``); the steps do the answering, :mod:`bot.core.health` the health checks.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import operator
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from datetime import timedelta
from typing import Any

from bot.core.backend_api import GenerationBackend
from bot.core.config import Settings
from bot.core.errors import (
    AccessDenied,
    BotError,
    BusyError,
    ModelUnavailable,
    QuotaExceeded,
    UnsupportedRequest,
    UserInputError,
)
from bot.core.frontend_api import (
    ApiKeyOwner,
    GenerationDefaults,
    Health,
    ImageLimits,
    PresetInfo,
    ThreadTurn,
    ThreadView,
)
from bot.core.health import HealthChecks, ProblemCheck
from bot.core.images import SUPPORTED
from bot.core.metrics import BotMetrics
from bot.core.pipeline import CUT_NOTE, Context, Parts, Timing, chain, steps
from bot.core.pipeline.command import help_text
from bot.core.previews import WebsitePreviews
from bot.core.requests import Final, FinalKind, ReplyEvent, ReplyFile, Request, ThreadRef
from bot.core.sanitize import clean_text
from bot.core.screenshot import PageRenderer
from bot.core.workers import STALE_AFTER_S, WorkerIdentity, is_gone
from storage import ID_LENGTHS, Database, as_utc, is_unavailable

__all__ = ["CUT_NOTE", "BotService", "help_text"]

log = logging.getLogger(__name__)


def _clean_request(request: Request) -> Request:
    """The request with every text field cleaned (ids too: they are stored and echoed)."""
    images = tuple(
        dataclasses.replace(i, filename=clean_text(i.filename), error=clean_text(i.error) if i.error else i.error)
        for i in request.images
    )
    return dataclasses.replace(
        request,
        platform=clean_text(request.platform),
        workspace=clean_text(request.workspace),
        channel=clean_text(request.channel),
        thread=clean_text(request.thread),
        user=clean_text(request.user),
        text=clean_text(request.text),
        images=images,
        event_id=clean_text(request.event_id) if request.event_id else request.event_id,
        preset=clean_text(request.preset) if request.preset else request.preset,
    )


def _clean_reply(event: ReplyEvent) -> ReplyEvent:
    """The reply with its text (and the names and captions of any files with it) cleaned."""
    changes: dict[str, Any] = {}
    if (text := clean_text(event.text)) != event.text:
        changes["text"] = text
    files = getattr(event, "files", ())
    cleaned = tuple(_clean_file(f) for f in files)
    if any(a is not b for a, b in zip(cleaned, files, strict=True)):
        changes["files"] = cleaned
    return dataclasses.replace(event, **changes) if changes else event


def _clean_file(file: Any) -> Any:
    names = {k: clean_text(v) for k in ("filename", "mime", "title") if isinstance(v := getattr(file, k, None), str)}
    return dataclasses.replace(file, **names) if any(getattr(file, k) != v for k, v in names.items()) else file


def _error_meta(exc: BotError, now: Any) -> dict[str, Any]:
    """``reason`` (and ``retry_after_s``) of a refusal's ``Final``, so an API can answer with the right status
    code (:class:`~bot.core.requests.Final`); the text stays the one every platform shows."""
    if isinstance(exc, QuotaExceeded):
        return {"reason": "quota", "retry_after_s": max(1.0, (exc.resets_at - now).total_seconds())}
    if isinstance(exc, BusyError):
        return {"reason": "busy", "retry_after_s": max(1.0, float(exc.retry_after_s))}
    reasons = ((AccessDenied, "access_denied"), (UnsupportedRequest, "unsupported"), (UserInputError, "bad_input"))
    return {"reason": next((name for kind, name in reasons if isinstance(exc, kind)), "unavailable")}


class BotService(Timing):
    """Ties config, storage, quotas, presets and the model backend together; implements
    :class:`bot.core.frontend_api.Core`, the only surface front ends use (the database and the backend stay
    private).  The request path is :func:`bot.core.pipeline.steps`; the timings it reads at each request are
    this class's attributes (:class:`~bot.core.pipeline.chain.Timing`'s, with the readiness timeouts)."""

    READY_DB_TIMEOUT_S = 1.0
    """How long the readiness check waits for ``SELECT 1``."""
    READY_CHECK_TIMEOUT_S = 1.0
    """How long it waits for one front end's ``problem()``."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        backend: GenerationBackend,
        metrics: BotMetrics | None = None,
        renderer: PageRenderer | None = None,
        worker: WorkerIdentity | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or BotMetrics()
        previews = WebsitePreviews(settings.render, self.metrics, renderer, settings.grounding)
        self._parts = Parts.build(settings, db, backend, metrics=self.metrics, previews=previews, worker=worker,
                                  timing=self)  # fmt: skip
        self.worker = self._parts.worker  # recorded with each answer this process writes
        self.metrics.watch_engine(backend.stats)
        self._health = HealthChecks(self._parts, self)
        self._chain = chain(steps(self._parts))

    # What the steps share, under the names the core's tests and tools have always used.
    _db = property(lambda self: self._parts.db)
    _access = property(lambda self: self._parts.access)
    _presets = property(lambda self: self._parts.presets)
    _quotas = property(lambda self: self._parts.quotas)
    _previews = property(lambda self: self._parts.previews)

    @property
    def _backend(self) -> GenerationBackend:
        return self._parts.backend

    @_backend.setter
    def _backend(self, backend: GenerationBackend) -> None:
        self._parts.backend = backend

    # ------------------------------------------------------------------ the Core API (bot.core.frontend_api)

    async def handle(self, request: Request) -> AsyncGenerator[ReplyEvent, None]:
        """Answer one message; yields nothing for a redelivered event.

        Text is cleaned once, here, both ways (:func:`~bot.core.sanitize.clean_text`): what the request
        brings before anything is stored, and every reply before any front end sends it.
        """
        started = time.monotonic()
        request = _clean_request(request)
        ctx = Context(request)
        try:
            # aclosing at every level: a reply closed early (the user left) closes the whole chain now,
            # down to the backend's request, and marks the answer interrupted before aclose() returns.
            async with aclosing(self._chain(ctx)) as events:
                async for event in events:
                    yield _clean_reply(event)
        except BotError as exc:
            ctx.outcome = outcome = type(exc).__name__
            if isinstance(exc, QuotaExceeded):
                self.metrics.quota_rejections.labels(exc.scope, exc.limit_name).inc()
            level = logging.WARNING if isinstance(exc, UnsupportedRequest) else logging.INFO  # a front end's fault
            log.log(level, "%s for %s/%s: %s", outcome, request.platform[:32], request.user[:128], exc)
            kind: FinalKind = "error" if not isinstance(exc, UserInputError) else "notice"
            meta = _error_meta(exc, self._db.now())
            yield Final(clean_text(exc.user_message), kind=kind, ephemeral=exc.ephemeral, meta=meta)
        except Exception as exc:
            ctx.outcome = outcome = "error"
            if is_unavailable(exc):  # an outage: one line, not a traceback per message
                log.error("database unavailable handling a %s message: %r", request.platform, exc)
            else:
                log.exception("unexpected error handling a %s message", request.platform)
            yield Final(ModelUnavailable("unexpected").user_message, kind="error", meta={"reason": "unavailable"})
        finally:
            self.metrics.requests.labels(request.platform, ctx.outcome).inc()
            if ctx.outcome == "answered":
                self.metrics.latency.labels(request.platform).observe(time.monotonic() - started)

    async def seen_event(self, platform: str, event_id: str) -> bool:
        """:meth:`Core.seen_event`: the ids cleaned as :meth:`handle` cleans them, and storage's rule, which
        agrees with the dedup ``handle`` applies; ``False`` when the database cannot tell (``handle`` then says so)."""
        platform, event_id = clean_text(platform), clean_text(event_id)
        if not event_id or len(platform) > ID_LENGTHS["platform"] or len(event_id) > ID_LENGTHS["event_id"]:
            return False  # handle() does not dedup these (no id) or refuses them (too long)
        try:
            return await self._db.event_seen(platform, event_id)
        except Exception as exc:
            log.debug("seen_event(%s, %s) could not tell: %r", platform, event_id, exc)
            return False

    async def thread(self, ref: ThreadRef, *, turns: bool = False) -> ThreadView:
        key = ref
        conversation = await self._db.live_conversation(key)
        stored = await self._db.turns(conversation.id) if conversation is not None else []
        info = await self._db.image_info([t.image_id for t in stored if t.image_id]) if turns else {}
        pictured = list(itertools.accumulate((t.image_id is not None for t in stored), operator.or_))
        shown = tuple(
            ThreadTurn(
                t.id,
                t.role,
                # an answer as it was shown (boxes taken out); the model is still sent the stored raw text
                self._previews.grounded.shown(clean_text(t.text or ""), had_picture=seen)
                if t.role == "assistant"
                else clean_text(t.text or ""),
                t.status,
                t.image_id is not None,
                as_utc(t.created_at) if t.created_at else None,  # SQLite returns naive UTC times
                info[t.image_id]["sha256"] if t.image_id in info else "",
            )
            for t, seen in zip(stored, pictured, strict=True)
        )
        return ThreadView(
            ref=ref,
            live=bool(stored),
            followed=await self._db.is_followed(key),
            has_image=any(t.image_id is not None for t in stored),
            turns=shown if turns else (),
            started_by=next((t.user_id or "" for t in stored if t.role == "user"), ""),
        )

    async def thread_image(self, ref: ThreadRef, turn_id: int) -> ReplyFile | None:
        conversation = await self._db.live_conversation(ref)
        turns = await self._db.turns(conversation.id) if conversation is not None else []
        image_id = next((t.image_id for t in turns if t.id == turn_id and t.role == "user"), None)
        if image_id is None:
            return None
        data, info = await self._db.image_data([image_id]), await self._db.image_info([image_id])
        return ReplyFile(f"picture-{turn_id}", info[image_id]["mime"], data[image_id]) if image_id in data else None

    def presets(self, workspace: str = "", channel: str = "") -> list[PresetInfo]:
        return [
            PresetInfo(clean_text(n), clean_text(self._presets.prompt(n, workspace, channel)))
            for n in self._presets.names
        ]

    @property
    def default_preset(self) -> str:
        return clean_text(self.settings.presets.default)

    def help_text(self) -> str:
        return clean_text(help_text(self._presets.names))

    @property
    def image_limits(self) -> ImageLimits:
        i = self.settings.images
        formats = tuple(label for _mime, label in SUPPORTED.values())  # what check_images decodes
        return ImageLimits(i.max_bytes, i.max_pixels, i.max_per_message, formats)

    @property
    def generation_defaults(self) -> GenerationDefaults:
        g = self.settings.generation
        return GenerationDefaults(g.max_new_tokens, g.max_length, g.temperature, g.top_p, g.do_sample)

    async def verify_api_key(self, platform: str, key: str) -> ApiKeyOwner | None:
        row = await self._db.verify_api_key(clean_text(platform), key)
        return None if row is None else ApiKeyOwner(row.key_id, row.user_id, row.workspace)

    async def health(self) -> Health:
        """Liveness: the process answers and the model backend describes itself.  No database, no network."""
        return await self._health.health()

    async def readiness(self) -> Health:
        """Readiness: ``database`` (``SELECT 1`` within :attr:`READY_DB_TIMEOUT_S`), ``engine`` and every
        watched front end (:meth:`watch_front_end`), checked now (:class:`~bot.core.health.HealthChecks`)."""
        return await self._health.readiness()

    def watch_front_end(self, name: str, problem: ProblemCheck) -> None:
        """Make a running front end's ``problem()`` (sync or async) the readiness check ``name``.

        ``serve`` registers every front end it started; the core knows them only by these names.
        """
        self._health.watch(name, problem)

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    async def prune_events(self) -> int:
        """Forget redelivery ids older than ``[database] event_retention_days`` (by the database's clock)."""
        keep = timedelta(days=self.settings.database.event_retention_days)
        count = await self._db.prune_events(self._db.now() - keep)
        if count:
            log.info("pruned %d processed event id(s) older than %s", count, keep)
        return count

    async def close(self) -> None:
        """Release what the core holds besides the database and the backend (the preview browser), and
        take this process off the worker list (best effort: else its heartbeat simply goes stale)."""
        await self._previews.close()
        try:
            await self._db.remove_worker(self.worker.id)
        except Exception as exc:
            log.warning("could not remove worker %s: %r", self.worker.id, exc)

    async def recover(self) -> int:
        """At start-up: register this process, and mark the answers left unfinished by processes that are
        gone as interrupted — not those another running process is still writing (:mod:`bot.core.workers`)."""
        me = self.worker
        await self._db.register_worker(me.id, me.host, me.pid)
        return await self._sweep([row.id for row in await self._db.workers() if is_gone(row, me)])

    async def heartbeat(self) -> int:
        """Every :data:`~bot.core.workers.HEARTBEAT_S`: touch this process's row, and mark the answers of
        processes whose heartbeat stopped as interrupted (a crash elsewhere, noticed without a restart)."""
        await self._db.register_worker(self.worker.id, self.worker.host, self.worker.pid)
        return await self._sweep(())

    async def _sweep(self, dead: Sequence[str]) -> int:
        """Mark the answers of gone processes (``dead``, or silent for :data:`STALE_AFTER_S`); our own row was
        just touched, so ours are spared."""
        live_since = self._db.now() - timedelta(seconds=STALE_AFTER_S)
        count = await self._db.mark_interrupted(live_since=live_since, dead=dead)
        if count:
            log.warning("marked %d unfinished answer(s) of stopped bot processes as interrupted", count)
        return count
