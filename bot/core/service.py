"""The bot core: one platform-neutral ``handle(request)`` that every adapter calls.

For each message: drop redeliveries (a unique event id in SQL) → access rules → commands
(``help``, ``reset``, ``settings``) → the thread's conversation → check and store new pictures
→ preset → quota → store the user turn and a pending answer → stream the answer from the
backend → store it with its token counts and a usage-ledger entry.  Errors become
:class:`~bot.core.requests.Final` replies with user-facing text; details go to the log.  A failed or
interrupted answer is marked as such; nothing already stored is deleted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from bot.core.access import AccessControl
from bot.core.backend import GenerationBackend
from bot.core.config import Settings
from bot.core.errors import (
    BotError,
    BusyError,
    ImageError,
    ModelUnavailable,
    NoImageError,
    QuotaExceeded,
    UserInputError,
)
from bot.core.images import check_image
from bot.core.metrics import BotMetrics
from bot.core.presets import Command, PresetBook, parse_message
from bot.core.quotas import QuotaPolicy
from bot.core.requests import Delta, Final, ReplyEvent, Request
from bot.core.sanitize import sanitize_output
from storage import ConversationKey, Database

__all__ = ["BotService", "help_text"]

log = logging.getLogger(__name__)


def help_text(presets: list[str]) -> str:
    names = ", ".join(f"`{p}`" for p in presets)
    return (
        "*MiniGPT-4* answers questions about pictures.\n"
        "• Send a picture with a question — or just a picture for a description.\n"
        "• Reply in the thread to follow up; new pictures join the conversation.\n"
        f"• Start with a preset name to use its prompt: {names}.\n"
        "• `reset` starts this thread over, `settings` shows the model and your limits, `help` shows this."
    )


class BotService:
    """Ties config, storage, quotas, presets and the model backend together."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        backend: GenerationBackend,
        metrics: BotMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.backend = backend
        self.metrics = metrics or BotMetrics()
        self.presets = PresetBook(settings.presets)
        self.quotas = QuotaPolicy(settings.quotas, db)
        self.access = AccessControl(db)
        self.metrics.watch_engine(backend.stats)

    async def handle(self, request: Request) -> AsyncIterator[ReplyEvent]:
        """Answer one message; yields nothing for a redelivered event."""
        started = time.monotonic()
        outcome = "answered"
        try:
            if request.event_id and not await self.db.mark_event(request.platform, request.event_id):
                log.info("ignoring redelivered event %s/%s", request.platform, request.event_id)
                outcome = "duplicate"
                return
            async for event in self._handle(request):
                yield event
        except BotError as exc:
            outcome = type(exc).__name__
            if isinstance(exc, QuotaExceeded):
                self.metrics.quota_rejections.labels(exc.scope, exc.limit_name).inc()
            log.info("%s for %s/%s: %s", outcome, request.platform, request.user, exc)
            kind = "error" if not isinstance(exc, UserInputError) else "notice"
            yield Final(exc.user_message, kind=kind, ephemeral=exc.ephemeral)
        except Exception:
            outcome = "error"
            log.exception("unexpected error handling a %s message", request.platform)
            yield Final(ModelUnavailable("unexpected").user_message, kind="error")
        finally:
            self.metrics.requests.labels(request.platform, outcome).inc()
            if outcome == "answered":
                self.metrics.latency.labels(request.platform).observe(time.monotonic() - started)

    async def _handle(self, request: Request) -> AsyncIterator[ReplyEvent]:
        await self.access.check(request.platform, request.workspace, request.channel, request.user)
        try:
            command = parse_message(request.text, self.presets.names, request.preset)
        except KeyError as exc:
            raise UserInputError(f"{exc.args[0]}. Say `help` for the list.") from None
        key = ConversationKey(request.platform, request.workspace, request.channel, request.thread)
        if command.command == "help":
            yield Final(help_text(self.presets.names), kind="help", ephemeral=True)
            return
        if command.command == "reset":
            live = await self.db.live_conversation(key)
            if live is not None:
                await self.db.archive_conversation(live.id)
            yield Final("Starting over: the next picture and question begin a new conversation.", kind="notice")
            return
        if command.command == "settings":
            yield Final(await self._settings_text(request), kind="notice", ephemeral=True)
            return
        async for event in self._answer(request, key, command):
            yield event

    async def _answer(self, request: Request, key: ConversationKey, command: Command) -> AsyncIterator[ReplyEvent]:
        limits = self.settings.images
        if len(request.images) > limits.max_per_message:
            raise ImageError(f"Please send at most {limits.max_per_message} pictures per message.")
        checked = [
            check_image(img.data, limits, name=img.filename or f"picture {i + 1}")
            for i, img in enumerate(request.images)
        ]
        conversation = await self.db.live_conversation(key)
        history = await self.db.turns(conversation.id) if conversation is not None else []
        if not checked and not any(t.image_id for t in history):
            raise NoImageError()
        if conversation is None:
            conversation = await self.db.get_or_create_conversation(key)
            history = await self.db.turns(conversation.id)
        question = self.presets.question(command, bool(checked), request.workspace, request.channel)
        if not question and not checked:
            raise UserInputError("What would you like to know about the picture?")
        await self.quotas.check(request.platform, request.workspace, request.user, len(checked), self.db.now())

        image_ids = [await self.db.add_image(c.data, c.mime, c.width, c.height) for c in checked]
        new_turns: list[dict[str, Any]] = [
            {"role": "user", "text": "", "image_id": i, "user_id": request.user} for i in image_ids[:-1]
        ]
        new_turns.append({"role": "user", "text": question, "image_id": image_ids[-1] if image_ids else None,
                          "user_id": request.user})  # fmt: skip
        new_turns.append({"role": "assistant", "status": "pending"})
        stored = await self.db.add_turns(conversation.id, new_turns)
        answer_turn = stored[-1]
        turns, images = await self._model_input(history + stored[:-1])
        async for event in self._stream(request, conversation.id, answer_turn.id, turns, images, len(checked)):
            yield event

    async def _model_input(self, history: list[Any]) -> tuple[list[dict[str, Any]], list[bytes]]:
        """The thread as model turns: finished answers only (failed/interrupted ones are left out)."""
        data = await self.db.image_data([t.image_id for t in history if t.image_id])
        turns: list[dict[str, Any]] = []
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
        self, request: Request, conversation_id: int, turn_id: int, turns: list, images: list, new_images: int
    ) -> AsyncIterator[ReplyEvent]:
        gen = self.settings.generation
        options = gen.model_dump()
        started = time.monotonic()
        parts: list[str] = []
        final: Any = None
        status, error = "failed", None
        try:
            stream = self.backend.stream(
                turns=turns, images=images, conversation_id=str(conversation_id), user=request.user, options=options
            )
            first = True
            async for event in stream:
                if getattr(event, "finish_reason", None) is not None:
                    final = event
                    continue
                if first:
                    first = False
                    await self.db.finish_turn(turn_id, status="streaming")
                if event.text:
                    parts.append(event.text)
                    yield Delta(sanitize_output(event.text))
            status = "done"
        except (asyncio.CancelledError, GeneratorExit):
            status, error = "interrupted", "cancelled"
            raise
        except Exception as exc:
            error = repr(exc)
            if getattr(exc, "retry_after_s", None) is not None:
                raise BusyError(exc.retry_after_s) from exc  # type: ignore[attr-defined]
            if getattr(exc, "user_message", None):
                raise UserInputError(exc.user_message) from exc  # type: ignore[attr-defined]
            log.exception("backend failed for conversation %s", conversation_id)
            raise ModelUnavailable(str(exc)) from exc
        finally:
            if status != "done":
                await asyncio.shield(self.db.finish_turn(turn_id, status=status, error=error, finish_reason=status))
        text = final.text if final is not None and getattr(final, "text", None) is not None else "".join(parts)
        text = sanitize_output(text.strip())
        completion = int(getattr(final, "completion_tokens", 0) or 0)
        ttft = getattr(final, "ttft_s", None)
        usage = dict(platform=request.platform, workspace=request.workspace, user_id=request.user,
                     requests=1, tokens=completion, images=new_images)  # fmt: skip
        await self.db.finish_turn(
            turn_id,
            usage=usage,
            text=text,
            status="done",
            finish_reason=getattr(final, "finish_reason", "eos"),
            prompt_tokens=int(getattr(final, "prompt_tokens", 0) or 0),
            completion_tokens=completion,
            ttft_ms=round(ttft * 1000) if ttft is not None else None,
            duration_ms=round((time.monotonic() - started) * 1000),
        )
        self.metrics.tokens.labels(request.platform).inc(completion)
        if ttft is not None:
            self.metrics.ttft.labels(request.platform).observe(ttft)
        yield Final(text or "(no answer)", kind="answer", meta={"tokens": completion, "turn_id": turn_id})

    async def _settings_text(self, request: Request) -> str:
        model = self.backend.describe()
        limits = await self.quotas.effective("user", request.platform, request.workspace, request.user)
        g = self.settings.generation
        lines = [
            f"*Model*: MiniGPT-4 `{model.get('variant', '?')}` on {model.get('device', '?')} "
            f"({model.get('dtype', '?')}{', demo weights' if model.get('demo') else ''})",
            f"*Answers*: up to {g.max_new_tokens} tokens, temperature {g.temperature}, top-p {g.top_p}, "
            f"{'sampling' if g.do_sample else 'greedy'}",
            f"*Presets*: {', '.join(self.presets.names)} (default for a bare picture: {self.settings.presets.default})",
        ]
        caps = [f"{name.replace('_', ' ')} {value}" for name, value in limits.model_dump().items() if value]
        lines.append("*Your limits*: " + (", ".join(caps) if caps else "none"))
        return "\n".join(lines)

    async def prune_events(self) -> int:
        """Forget redelivery ids older than ``[database] event_retention_days`` (by the database's clock)."""
        keep = timedelta(days=self.settings.database.event_retention_days)
        count = await self.db.prune_events(self.db.now() - keep)
        if count:
            log.info("pruned %d processed event id(s) older than %s", count, keep)
        return count

    async def recover(self) -> int:
        """At start-up: mark answers left streaming by a crash as interrupted."""
        count = await self.db.mark_interrupted()
        if count:
            log.warning("marked %d unfinished answer(s) from a previous run as interrupted", count)
        return count
