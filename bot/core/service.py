"""The bot core: one platform-neutral ``handle(request)`` that every adapter calls.

For each message: drop redeliveries (a unique event id in SQL) → access rules → commands
(``help``, ``reset``, ``settings``) → the thread's conversation → check and store new pictures
→ preset → quota (checked and the request's usage reserved in one transaction) → store the user
turn and a pending answer → stream the answer from the backend → store it with its token counts,
completing the usage reservation.  Errors become :class:`~bot.core.requests.Final` replies with
user-facing text; details go to the log.  A failed or interrupted answer is marked as such and keeps the
text streamed until then (stored about every second while streaming, so a crash keeps most of it); no
stored history is deleted (a failed answer only gives its usage reservation back).  A retried event whose
answer failed or was interrupted is answered again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import itertools
import logging
import operator
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from datetime import timedelta
from typing import Any

from bot.core.access import AccessControl
from bot.core.backend_api import ChatTurn, GenerationBackend
from bot.core.config import Settings
from bot.core.errors import (
    AccessDenied,
    BotError,
    BusyError,
    ImageError,
    ModelUnavailable,
    NoImageError,
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
from bot.core.grounding import task_help
from bot.core.images import SUPPORTED, check_images
from bot.core.metrics import BotMetrics
from bot.core.presets import Command, PresetBook, parse_message
from bot.core.previews import WebsitePreviews
from bot.core.quotas import QuotaPolicy
from bot.core.reports import quota_overview
from bot.core.requests import (
    Delta,
    Final,
    GenerationRequest,
    HistoryTurn,
    ReplyEvent,
    ReplyFile,
    Request,
    ThreadRef,
)
from bot.core.sanitize import StreamSanitizer, clean_text, sanitize_output
from bot.core.screenshot import PageRenderer
from bot.core.workers import STALE_AFTER_S, WorkerIdentity, is_gone
from model.engine.contract import Busy, FinalEvent, RequestFailed, RequestRejected, TokenEvent
from storage import ID_LENGTHS, ConversationKey, Database, as_utc
from storage.db import is_unavailable

__all__ = ["CUT_NOTE", "BotService", "help_text"]

log = logging.getLogger(__name__)

ProblemCheck = Callable[[], "str | Awaitable[str | None] | None"]
"""A running front end's readiness check (``FrontEnd.problem``): ``None`` when fine, else one line."""


CUT_NOTE = (
    "(This thread is now longer than the model reads at once, so it sees only the most recent part: its first "
    "messages and maybe the picture no longer count. Say reset to start over.)"
)
"""Appended to the first answer of a thread whose oldest part was cut to fit ``max_length`` (the reference's
left cut), so the user knows why the answers may forget the beginning."""


def help_text(presets: list[str]) -> str:
    """The one help text, plain (no markup): every front end shows it as is or escaped."""
    names = ", ".join(presets)
    eg = "story" if "story" in presets or not presets else presets[0]  # an example the bot really has
    return (
        "MiniGPT-4 answers questions about pictures.\n"
        "• Send a picture with a question — or just a picture for a description.\n"
        "• Reply in the thread to follow up; new pictures join the conversation.\n"
        f"• Presets ask with a prepared prompt: {names}. Send the name alone ({eg}), or after a slash with "
        f"words to add (/{eg} about a cat; !{eg} works too). Other messages are asked as written.\n"
        '• "reset" starts this thread over, "settings" shows the model and your limits, "help" shows this.'
    ) + (f"\n{tasks}" if (tasks := task_help(presets)) else "")


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


def _check_ids(request: Request) -> None:
    """Refuse ids longer than the tables keep (PostgreSQL would fail the first insert, SQLite would keep them:
    the same refusal on both, before anything is stored)."""
    for name, limit in ID_LENGTHS.items():
        if len(value := getattr(request, name) or "") > limit:
            raise UnsupportedRequest(
                f"the front end sent a {name} of {len(value)} characters; at most {limit} are stored"
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


def _stored_error(exc: BaseException) -> str:
    """What the ``error`` column keeps of an exception: one cleaned, bounded text (details are in the log)."""
    return clean_text(repr(exc))[:2000]


def _error_meta(exc: BotError, now: Any) -> dict[str, Any]:
    """``reason`` (and ``retry_after_s``) of a refusal's ``Final``, so an API can answer with the right status
    code (:class:`~bot.core.requests.Final`); the text stays the one every platform shows."""
    if isinstance(exc, QuotaExceeded):
        return {"reason": "quota", "retry_after_s": max(1.0, (exc.resets_at - now).total_seconds())}
    if isinstance(exc, BusyError):
        return {"reason": "busy", "retry_after_s": max(1.0, float(exc.retry_after_s))}
    reasons = ((AccessDenied, "access_denied"), (UnsupportedRequest, "unsupported"), (UserInputError, "bad_input"))
    return {"reason": next((name for kind, name in reasons if isinstance(exc, kind)), "unavailable")}


STOP_LIMITS = (4, 64)
"""At most this many stop strings per request, of at most this many characters (OpenAI's own count limit)."""


def _generation_options(settings: Any, wanted: GenerationRequest | None) -> dict[str, Any]:
    """The backend options for one request: ``[generation]`` with the request's choices, each checked against
    ``[generation]``'s bounds (:class:`~bot.core.requests.GenerationRequest`); a bad one is a
    :class:`UserInputError` raised before anything is stored or charged."""
    options = settings.model_dump()
    if wanted is None:
        return options
    if (n := wanted.max_new_tokens) is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= settings.max_new_tokens:
            raise UserInputError(f"The answer length must be 1 to {settings.max_new_tokens} tokens here (got {n}).")
        options["max_new_tokens"] = n
    if (t := wanted.temperature) is not None:
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 5:
            raise UserInputError(f"The temperature must be between 0 and 5 (got {t}).")
        options["do_sample"] = t > 0  # 0: greedy, as OpenAI-style clients mean it
        if t > 0:
            options["temperature"] = float(t)
    if (p := wanted.top_p) is not None:
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise UserInputError(f"top_p must be above 0 and at most 1 (got {p}).")
        options["top_p"] = float(p)
    count, length = STOP_LIMITS
    if wanted.stop:
        if len(wanted.stop) > count or not all(isinstance(x, str) and 1 <= len(x) <= length for x in wanted.stop):
            raise UserInputError(f"Give at most {count} stop strings of 1 to {length} characters each.")
        options["stop_sequences"] = list(wanted.stop)  # added to the model's own stop strings by the backend
    if (seed := wanted.seed) is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise UserInputError(f"The seed must be a whole number from 0 to 2^63 - 1 (got {seed}).")
        options["seed"] = seed
    return options


def _key(ref: ThreadRef) -> ConversationKey:
    return ConversationKey(ref.platform, ref.workspace, ref.channel, ref.thread)


def _streamed(parts: list[str]) -> str:
    """The text of the tokens streamed so far, cleaned as a finished answer would be."""
    return sanitize_output("".join(parts)).strip()


class _PartialSaver:
    """Stores an answer's streamed text every ``every_s`` seconds while it streams, so a crash (kill -9)
    keeps most of what the user saw: in the background, at most one write in flight, so a slow database
    delays no token.  Best effort: a failed write is logged once and the answer goes on."""

    def __init__(self, db: Database, turn_id: int, every_s: float) -> None:
        self._db, self._turn_id, self._every_s = db, turn_id, every_s
        self._due = time.monotonic() + every_s
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    def offer(self, parts: list[str]) -> None:
        """Called after each token: starts a write when one is due and none is running."""
        now = time.monotonic()
        if now < self._due or (self._task is not None and not self._task.done()):
            return
        self._due = now + self._every_s
        self._task = asyncio.ensure_future(self._write(_streamed(parts)))

    async def settle(self) -> None:
        """Wait for a write still in flight (the answer is finishing normally)."""
        if self._task is not None:
            await self._task

    async def _write(self, text: str) -> None:
        try:
            await self._db.save_partial(self._turn_id, text)
        except Exception as exc:
            if not self._warned:
                self._warned = True
                log.warning("turn %s: could not store the text streamed so far: %r", self._turn_id, exc)


class BotService:
    """Ties config, storage, quotas, presets and the model backend together; implements
    :class:`bot.core.frontend_api.Core`, the only surface front ends use (the database and the backend stay private)."""

    READY_DB_TIMEOUT_S = 1.0
    """How long the readiness check waits for ``SELECT 1``."""
    READY_CHECK_TIMEOUT_S = 1.0
    """How long it waits for one front end's ``problem()``."""
    STORE_RETRY_DELAYS_S: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    """Waits between the tries of an answer's final write (6 tries over ~8 s): the user has seen the answer."""
    PARTIAL_SAVE_S = 1.0
    """How often the text of an answer being streamed is stored (one small UPDATE, in the background): a
    kill -9 mid-answer loses at most about this much of what the user saw.  Not a setting: a second is
    cheap for the database at any load the engine can stream, and short next to any answer worth keeping."""

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
        self.worker = worker or WorkerIdentity.this_process()  # recorded with each answer this process writes
        self._db = db
        self._backend = backend
        self.metrics = metrics or BotMetrics()
        self._presets = PresetBook(settings.presets, settings.model.variant)  # + MiniGPT-v2's tasks for minigptv2
        self._quotas = QuotaPolicy(settings.quotas, db)
        self._access = AccessControl(db)
        self.metrics.watch_engine(backend.stats)
        self._front_ends: dict[str, ProblemCheck] = {}
        self._checks: dict[str, str] = {}  # the last readiness result, to log only the changes
        self._writes: set[asyncio.Task[bool]] = set()  # final writes that outlive a cancelled request
        self._previews = WebsitePreviews(settings.render, self.metrics, renderer, settings.grounding)

    # ------------------------------------------------------------------ the Core API (bot.core.frontend_api)

    async def handle(self, request: Request) -> AsyncIterator[ReplyEvent]:
        """Answer one message; yields nothing for a redelivered event.

        Text is cleaned once, here, both ways (:func:`~bot.core.sanitize.clean_text`): what the request
        brings before anything is stored, and every reply before any front end sends it.
        """
        started = time.monotonic()
        outcome = "answered"
        request = _clean_request(request)
        try:
            _check_ids(request)
            if request.event_id and not await self._db.mark_event(request.platform, request.event_id):
                log.info("ignoring redelivered event %s/%s", request.platform, request.event_id)
                outcome = "duplicate"
                return
            # aclosing at every level: a reply closed early (the user left) closes the whole chain now,
            # down to the backend's request, and marks the answer interrupted before aclose() returns.
            async with aclosing(self._handle(request)) as events:
                async for event in events:
                    yield _clean_reply(event)
        except BotError as exc:
            outcome = type(exc).__name__
            if isinstance(exc, QuotaExceeded):
                self.metrics.quota_rejections.labels(exc.scope, exc.limit_name).inc()
            level = logging.WARNING if isinstance(exc, UnsupportedRequest) else logging.INFO  # a front end's fault
            log.log(level, "%s for %s/%s: %s", outcome, request.platform[:32], request.user[:128], exc)
            kind = "error" if not isinstance(exc, UserInputError) else "notice"
            meta = _error_meta(exc, self._db.now())
            yield Final(clean_text(exc.user_message), kind=kind, ephemeral=exc.ephemeral, meta=meta)
        except Exception as exc:
            outcome = "error"
            if is_unavailable(exc):  # an outage: one line, not a traceback per message
                log.error("database unavailable handling a %s message: %r", request.platform, exc)
            else:
                log.exception("unexpected error handling a %s message", request.platform)
            yield Final(ModelUnavailable("unexpected").user_message, kind="error", meta={"reason": "unavailable"})
        finally:
            self.metrics.requests.labels(request.platform, outcome).inc()
            if outcome == "answered":
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
        key = _key(ref)
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
                t.image_id is not None,  # type: ignore[arg-type]
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
        conversation = await self._db.live_conversation(_key(ref))
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
        try:
            model, stats = self._backend.describe(), self._backend.stats()
        except Exception as exc:
            log.warning("health check: the model backend did not answer: %s", exc)
            return Health(ok=False, checks={"engine": "the model backend did not answer"})
        engine = {k: stats.get(k) for k in ("queue_depth", "batch_size")}
        return Health(ok=True, model=model, engine=engine, checks={"engine": "ok"})

    async def readiness(self) -> Health:
        """Readiness: ``database`` (``SELECT 1`` within :attr:`READY_DB_TIMEOUT_S`), ``engine`` and every
        watched front end (:meth:`watch_front_end`), checked now.  Sets the ``minigpt4_ready`` and
        ``minigpt4_check_ok`` gauges; a check that changes state is logged once."""
        database, front_ends = await asyncio.gather(
            self._check_database(),
            asyncio.gather(*(self._check_front_end(check) for check in self._front_ends.values())),
        )
        model, engine, engine_state = await self._check_engine()
        checks = {"database": database, "engine": engine_state, **dict(zip(self._front_ends, front_ends, strict=True))}
        for name, state in checks.items():
            if state != self._checks.get(name, "ok"):
                if state == "ok":
                    log.info("readiness: %s is ok again", name)
                else:
                    log.warning("readiness: %s: %s", name, state)
        self._checks = checks
        self.metrics.set_readiness(checks)
        return Health(ok=all(v == "ok" for v in checks.values()), model=model, engine=engine, checks=checks)

    def watch_front_end(self, name: str, problem: ProblemCheck) -> None:
        """Make a running front end's ``problem()`` (sync or async) the readiness check ``name``.

        ``serve`` registers every front end it started; the core knows them only by these names.
        """
        self._front_ends[clean_text(name)] = problem

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    # ------------------------------------------------------------------ readiness checks

    async def _check_database(self) -> str:
        try:
            await self._db.ping(timeout=self.READY_DB_TIMEOUT_S)
        except TimeoutError:
            return f"no answer within {self.READY_DB_TIMEOUT_S:g} s"
        except Exception as exc:
            if self._checks.get("database", "ok") == "ok":
                log.warning("readiness: the database ping failed: %r", exc)
            return f"unreachable ({type(exc).__name__})"
        return "ok"

    async def _check_engine(self) -> tuple[dict[str, Any], dict[str, Any], str]:
        """The model facts, the engine gauges, and the state: the backend answers (and its own optional
        ``problem()`` — e.g. a remote backend's connection — says nothing is wrong)."""
        try:
            model, stats = self._backend.describe(), self._backend.stats()
            check = getattr(self._backend, "problem", None)
            problem = await self._check_front_end(check) if callable(check) else "ok"
        except Exception as exc:
            log.debug("readiness: the model backend did not answer: %r", exc)
            return {}, {}, "the model backend did not answer"
        return model, {k: stats.get(k) for k in ("queue_depth", "batch_size")}, problem

    async def _check_front_end(self, problem: ProblemCheck) -> str:
        try:
            result = problem()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, self.READY_CHECK_TIMEOUT_S)
        except TimeoutError:
            return f"no answer within {self.READY_CHECK_TIMEOUT_S:g} s"
        except Exception as exc:
            log.debug("readiness check failed", exc_info=exc)
            return f"the check failed ({type(exc).__name__})"
        return "ok" if result is None else clean_text(str(result)).strip() or "not ready"

    # ------------------------------------------------------------------ answering

    async def _handle(self, request: Request) -> AsyncIterator[ReplyEvent]:
        await self._access.check(
            request.platform, request.workspace, request.channel, request.user, roles=request.roles
        )
        key = _key(request.ref)
        if request.addressed:
            await self._db.follow_thread(key)
        failed = next((img.error for img in request.images if img.error), None)
        if failed:
            raise ImageError(failed)
        try:
            command = parse_message(request.text, self._presets.names, request.preset)
        except KeyError as exc:
            raise UserInputError(f"{exc.args[0]}. Say help for the list.") from None
        if command.command == "help":
            yield Final(self.help_text(), kind="help", ephemeral=True)
            return
        if command.command == "reset":
            live = await self._db.live_conversation(key)
            if live is not None:
                await self._db.archive_conversation(live.id)
            await self._db.follow_thread(key)  # a picture posted after the reset starts anew, even after a restart
            yield Final("Starting over: the next picture and question begin a new conversation.", kind="notice")
            return
        if command.command == "settings":
            yield Final(await self._settings_text(request), kind="notice", ephemeral=True)
            return
        async with aclosing(self._answer(request, key, command)) as events:
            async for event in events:
                yield event

    async def _answer(self, request: Request, key: ConversationKey, command: Command) -> AsyncIterator[ReplyEvent]:
        limits = self.settings.images
        if len(request.images) > limits.max_per_message:
            raise ImageError(f"Please send at most {limits.max_per_message} pictures per message.")
        options = _generation_options(self.settings.generation, request.generation)
        named = [(img.data, img.filename or f"picture {i + 1}") for i, img in enumerate(request.images)]
        checked = await check_images(named, limits)  # decoded off the event loop, in a bounded pool
        seeded = await self._seed_turns(request) if request.history is not None else None
        conversation = await self._db.live_conversation(key)
        history = await self._db.turns(conversation.id) if conversation is not None and seeded is None else []
        seeded_images = [c for _turn, pictures in seeded or () for c in pictures]
        if not checked and not seeded_images and not any(t.image_id for t in history):
            raise NoImageError()
        # Preset prompts come from bot.toml, where "\u0000" is valid TOML: clean what is stored and sent.
        question = clean_text(self._presets.question(command, bool(checked), request.workspace, request.channel))
        if not question and not checked:
            raise UserInputError("What would you like to know about the picture?")
        pictures = len(checked) + len(seeded_images)
        usage_id = await self._quotas.admit(request.platform, request.workspace, request.user, pictures)
        try:
            if seeded is not None and conversation is not None:  # the client's history replaces the stored one
                await self._db.archive_conversation(conversation.id)
                conversation = None
            if conversation is None:  # only now: a refused request leaves no empty conversation behind
                conversation = await self._db.get_or_create_conversation(key)
                history = await self._db.turns(conversation.id)
            new_turns = [row for turn, found in seeded or () for row in await self._stored_rows(request, turn, found)]
            image_ids = [await self._db.add_image(c.data, c.mime, c.width, c.height) for c in checked]
            new_turns += [{"role": "user", "text": "", "image_id": i, "user_id": request.user} for i in image_ids[:-1]]
            new_turns.append({"role": "user", "text": question, "image_id": image_ids[-1] if image_ids else None,
                              "user_id": request.user})  # fmt: skip
            new_turns.append({"role": "assistant", "status": "pending", "worker": self.worker.id})
            event = (request.platform, request.event_id) if request.event_id else None
            stored = await self._db.add_turns(conversation.id, new_turns, event=event)
        except BaseException:
            await self._release(usage_id)  # nothing was stored or sent: the request is not charged
            raise
        answer_turn = stored[-1]
        turns, images = await self._model_input(history + stored[:-1])
        told = any(self._was_cut(t.prompt_tokens) for t in history if t.role == "assistant" and t.status == "done")
        streamed = self._stream(request, conversation.id, answer_turn.id, usage_id, turns, images, options)
        async with aclosing(streamed) as events:
            async for event in events:
                if isinstance(event, Final):
                    event = await self._previews.attach(event, images[-1] if images else None)  # the latest
                    if event.meta.get("context_cut") and not told:  # once per thread: the first cut answer
                        event = dataclasses.replace(event, text=f"{event.text}\n\n{CUT_NOTE}")
                yield event

    async def _seed_turns(self, request: Request) -> list[tuple[HistoryTurn, list[Any]]]:
        """The request's :attr:`~bot.core.requests.Request.history`, each user turn's pictures checked as a
        message's are (a bad one is named by its message), before anything is stored or charged."""
        limits, seeded = self.settings.images, []
        for number, turn in enumerate(request.history or (), start=1):
            if turn.role == "user" and any(img.error for img in turn.images):
                raise ImageError(next(img.error for img in turn.images if img.error) or "")
            named = [(img.data, clean_text(img.filename) or f"picture {i + 1} of message {number}") for i, img in
                     enumerate(turn.images)]  # fmt: skip
            seeded.append((turn, await check_images(named, limits) if turn.role == "user" else []))
        return seeded

    async def _stored_rows(self, request: Request, turn: HistoryTurn, checked: list[Any]) -> list[dict[str, Any]]:
        """The turn rows one history turn is stored as: an answer as given; a user turn as a message is (its
        pictures first, a preset named in its text asked with its prompt)."""
        text = clean_text(turn.text)
        if turn.role == "assistant":
            return [{"role": "assistant", "text": text, "status": "done", "finish_reason": "history"}]
        try:
            command = parse_message(text, self._presets.names, None)
            if command.command is None:
                text = clean_text(self._presets.question(command, bool(checked), request.workspace, request.channel))
        except KeyError:
            pass  # an unknown /word in an earlier message: kept as written
        ids = [await self._db.add_image(c.data, c.mime, c.width, c.height) for c in checked]
        rows: list[dict[str, Any]] = [{"role": "user", "text": "", "image_id": i, "user_id": request.user}
                                      for i in ids[:-1]]  # fmt: skip
        rows.append({"role": "user", "text": text, "image_id": ids[-1] if ids else None, "user_id": request.user})
        return rows

    def _was_cut(self, prompt_tokens: int) -> bool:
        """Whether an answer's thread was cut from the left: backends report the prompt tokens they kept, at
        most ``max_length - max_new_tokens`` (the engine's cut); a prompt that reaches that size was cut (or
        fits exactly — the next turn will not)."""
        g = self.settings.generation
        return prompt_tokens >= g.max_length - g.max_new_tokens

    async def _release(self, usage_id: int) -> None:
        try:
            await asyncio.shield(self._db.release_usage(usage_id))
        except Exception as exc:
            log.error("usage entry %s: could not release the reservation of an unstored request: %r", usage_id, exc)

    async def _model_input(self, history: Sequence[Any]) -> tuple[list[ChatTurn], list[bytes]]:
        """The thread as model turns: finished answers only (failed/interrupted ones are left out), and no
        question whose message was retried (its retry asks it again)."""
        history = [t for t in history if not (t.role == "user" and t.status == "retried")]
        data = await self._db.image_data([t.image_id for t in history if t.image_id])
        turns: list[ChatTurn] = []
        images: list[bytes] = []
        for t in history:
            if t.role == "assistant":
                if t.status == "done" and t.text:
                    turns.append({"role": "assistant", "text": t.text})
                continue
            turns.append({"role": "user", "text": t.text, "image": t.image_id is not None})
            if t.image_id is not None:
                images.append(data[t.image_id])
        return turns, images

    async def _stream(
        self,
        request: Request,
        conversation_id: int,
        turn_id: int,
        usage_id: int,
        turns: list[ChatTurn],
        images: list[bytes],
        options: dict[str, Any],
    ) -> AsyncIterator[ReplyEvent]:
        """Stream the answer and store it; the request's usage reservation is settled in the same write:
        completed with the tokens, kept for an interrupted answer with the tokens generated until then (the
        work was done), released for a failed one (the bot could not answer, so the user is not charged)."""
        started = time.monotonic()
        parts: list[str] = []
        final: FinalEvent | None = None
        status, error = "failed", None
        generated = 0  # token events seen: what an interrupted answer is charged
        stream: AsyncIterator[TokenEvent | FinalEvent] | None = None
        partial = _PartialSaver(self._db, turn_id, self.PARTIAL_SAVE_S)  # what a crash or a walk-away keeps
        try:
            stream = self._backend.stream(
                turns=turns,
                images=images,
                conversation_id=str(conversation_id),
                user=request.user,
                options=options,
            )
            first, shown = True, StreamSanitizer()  # a mention or CRLF split over tokens is never let out
            async for event in stream:
                if isinstance(event, FinalEvent):
                    final = event
                    continue
                if not isinstance(event, TokenEvent):
                    raise TypeError(f"the backend streamed a {type(event).__name__}, not a token or final event")
                generated += 1
                if first:
                    first = False
                    await self._mark_streaming(turn_id)
                if event.text:
                    parts.append(event.text)
                    partial.offer(parts)
                    if safe := shown.feed(event.text):
                        yield Delta(safe)
            if rest := shown.flush():
                yield Delta(rest)
            status = "done"
        except (asyncio.CancelledError, GeneratorExit):
            status, error = "interrupted", "cancelled"
            raise
        except Exception as exc:
            error = _stored_error(exc)
            raise self._engine_error(exc, conversation_id) from exc
        finally:
            if status != "done" and (close := getattr(stream, "aclose", None)) is not None:
                try:  # now, not when the garbage collector finds it: this cancels the backend's request
                    await asyncio.shield(close())
                except Exception as exc:
                    log.warning("turn %s: closing the backend stream failed: %r", turn_id, exc)
            if status != "done":
                try:  # the text streamed so far is kept: the user saw it (a late partial write cannot undo this)
                    await asyncio.shield(
                        self._db.finish_turn(turn_id, status=status, error=error, finish_reason=status,
                                             text=_streamed(parts), usage_id=usage_id, tokens=generated,
                                             release=status == "failed")
                    )  # fmt: skip
                except Exception as exc:  # the database is down too: recover() marks it interrupted at the next start
                    log.error("turn %s: could not mark the answer %s: %r", turn_id, status, exc)
        text = sanitize_output(final.text if final is not None else "".join(parts)).strip()
        completion = final.completion_tokens if final is not None else 0
        ttft = final.ttft_s if final is not None else None
        values = dict(
            usage_id=usage_id,
            tokens=completion,
            text=text,
            status="done",
            finish_reason=clean_text(final.finish_reason or "eos")[:16] if final is not None else "eos",
            prompt_tokens=final.prompt_tokens if final is not None else 0,
            completion_tokens=completion,
            ttft_ms=round(ttft * 1000) if ttft is not None else None,
            duration_ms=round((time.monotonic() - started) * 1000),
        )
        await partial.settle()  # its write finishes before the final one (which it could not undo anyway)
        # The user has seen this answer stream: its final write outlives a database blip (bounded retries)
        # and a request cancelled meanwhile (a task of its own), and the answer is shown even if it fails.
        write = asyncio.ensure_future(self._store_answer(conversation_id, turn_id, values))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        await asyncio.shield(write)
        self.metrics.tokens.labels(request.platform).inc(completion)
        if ttft is not None:
            self.metrics.ttft.labels(request.platform).observe(ttft)
        cut = final is not None and self._was_cut(final.prompt_tokens)
        meta = {
            "tokens": completion, "turn_id": turn_id, "context_cut": cut,
            "prompt_tokens": final.prompt_tokens if final is not None else 0,
            "cached_prompt_tokens": final.reused_prefix_tokens if final is not None else 0,
            "finish_reason": values["finish_reason"],
        }  # fmt: skip
        yield Final(text or "(no answer)", kind="answer", meta=meta)

    async def _mark_streaming(self, turn_id: int) -> None:
        """Best effort: a blip here must not end an answer that the final write may still store."""
        try:
            await self._db.finish_turn(turn_id, status="streaming")
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            log.warning("turn %s: could not mark the answer streaming: %r", turn_id, exc)

    async def _store_answer(self, conversation_id: int, turn_id: int, values: dict[str, Any]) -> bool:
        """Write the finished answer, retrying while the database is unavailable
        (:attr:`STORE_RETRY_DELAYS_S`); ``False`` (and an error naming the turn) when it gives up."""
        delays = self.STORE_RETRY_DELAYS_S
        for attempt in range(len(delays) + 1):
            try:
                # A try whose commit went through but whose reply was lost is done (the write is idempotent).
                if attempt and await self._answer_stored(conversation_id, turn_id):
                    return True
                await self._db.finish_turn(turn_id, **values)
            except Exception as exc:
                transient = is_unavailable(exc)
                if not transient or attempt == len(delays):
                    self.metrics.answers_unsaved.inc()
                    log.error(
                        "turn %s: giving up storing the answer after %d tr%s (the user was shown it): %r",
                        turn_id, attempt + 1, "y" if attempt == 0 else "ies", exc, exc_info=not transient,
                    )  # fmt: skip
                    return False
                self.metrics.answer_store_retries.inc()
                log.warning("turn %s: storing the answer failed (%r); retrying in %g s", turn_id, exc, delays[attempt])
                await asyncio.sleep(delays[attempt])
            else:
                if attempt:
                    log.info("turn %s: answer stored on try %d", turn_id, attempt + 1)
                return True
        return False  # pragma: no cover - the loop returns

    async def _answer_stored(self, conversation_id: int, turn_id: int) -> bool:
        return any(t.id == turn_id and t.status == "done" for t in await self._db.turns(conversation_id))

    @staticmethod
    def _engine_error(exc: Exception, conversation_id: int) -> BotError:
        """What the user is told for a backend error: decided here, by type, never by the backend."""
        if isinstance(exc, Busy):
            return BusyError(exc.retry_after_s)
        if isinstance(exc, RequestRejected) and exc.reason == "image":
            which = f"picture {exc.image_index + 1}" if exc.image_index is not None else "a picture"
            log.info("conversation %s: %s", conversation_id, exc)
            return ImageError(f"I couldn't read {which} of this thread as an image. Please send it again.")
        if isinstance(exc, RequestRejected) and exc.reason == "too_large":
            log.info("conversation %s: %s", conversation_id, exc)
            return UserInputError(
                "This thread is too long for the model now. Say reset to start over (you can post the picture again)."
            )
        if isinstance(exc, RequestFailed | RequestRejected):
            log.error("backend failed for conversation %s: %s", conversation_id, exc)
        else:
            log.error("backend failed for conversation %s", conversation_id, exc_info=exc)
        return ModelUnavailable(str(exc))

    async def _settings_text(self, request: Request) -> str:
        model = self._backend.describe()
        overview = await quota_overview(
            self._db, self.settings.quotas, request.platform, request.workspace, request.user
        )
        g = self.settings.generation
        lines = [
            f"Model: MiniGPT-4 {model.get('variant', '?')} on {model.get('device', '?')} "
            f"({model.get('dtype', '?')}{', demo weights' if model.get('demo') else ''})",
            f"Answers: up to {g.max_new_tokens} tokens, temperature {g.temperature}, top-p {g.top_p}, "
            f"{'sampling' if g.do_sample else 'greedy'}",
            f"Presets: {', '.join(self._presets.names)} (default for a bare picture: {self.settings.presets.default})",
        ]
        limited = False
        for scope in overview.scopes:  # the user's, then the workspace's: each limit with what is used of it
            caps = [f"{q.name.replace('_', ' ')} {q.effective} ({q.used} used)" for q in scope.lines if q.effective]
            limited = limited or bool(caps)
            if scope.scope == "user":
                lines.append("Your limits: " + (", ".join(caps) if caps else "none"))
            elif caps:
                lines.append("This workspace's limits (everyone together): " + ", ".join(caps))
        if limited:
            lines.append("Days and months are UTC: daily counts start over at 00:00 UTC.")
        return "\n".join(lines)

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
