"""The shared inference engine: async ``submit`` in front, one worker thread doing all tensor work.

``Engine.submit(request)`` validates and queues a request and returns a :class:`RequestStream`
— an async iterator of :class:`~model.engine.contract.TokenEvent` ending with one
:class:`~model.engine.contract.FinalEvent`.  Stopping the iteration early (``aclose``, ``cancel``, a
cancelled task) aborts the request and frees its batch slot.

Errors are those of the contract in :mod:`model.engine.contract`, and carry no user-facing text:
``submit`` raises :class:`~model.engine.contract.Busy`, :class:`~model.engine.contract.RequestTooLarge`
(the KV budget) or :class:`~model.engine.contract.RequestRejected` (``"invalid"``: bad options — an
:class:`~model.sampling.InvalidGenerationOptions` —, a placeholder/picture count mismatch, a
request id in use); the stream raises ``RequestRejected("image", …, image_index=i)`` for a
picture that cannot be decoded and :class:`~model.engine.contract.RequestFailed` when a step crashes.

Beam search (``num_beams > 1``) runs alone through :func:`model.generate.beam_search`; its
tokens are streamed as ordinary token events once the search has ended, then the final event.

The worker loop, per iteration: ask the :class:`Scheduler` for a plan → evict prefixes it
names → prepare the admitted sequences and prefill them in one batch (each emits its first token) → one batched
decode step for the running rows → remove finished / aborted / overdue rows, keeping their
KV as conversation prefixes → report to the scheduler.  Nothing here blocks the event loop:
events cross back with ``loop.call_soon_threadsafe``, one call per loop after the prefills and
one after the decode step, whatever the batch size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from model.conversation import IMAGE_PLACEHOLDER
from model.engine.contract import Busy, EngineError, FinalEvent, RequestFailed, RequestRejected, TokenEvent
from model.engine.cpu_tuning import keep_freed_memory, lay_out_for_cpu
from model.engine.metrics import EngineMetrics
from model.engine.runner import Runner
from model.engine.scheduler import Scheduler, SchedulerConfig, SeqInfo, StepResult
from model.engine.threads import ThreadSettings, apply_thread_settings, thread_settings
from model.engine.types import EngineRequest, FinishReason, SeqState
from model.generate import beam_search, decode_answer, default_options
from model.minigpt4 import MiniGPT4
from model.sampling import RowFinish

__all__ = ["Engine", "EngineConfig", "RequestStream"]

log = logging.getLogger(__name__)

Event = TokenEvent | FinalEvent


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits (documented under ``[engine]`` in bot.toml)."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    image_cache_size: int = 256
    prefix_reuse: bool = True
    threads: int = 0  # torch intra-op threads; 0 = derived from the usable cores (model.engine.threads)


class RequestStream:
    """Async iterator over one request's events; ``cancel()`` / ``aclose()`` abort it."""

    def __init__(self, engine: Engine, seq: SeqState, queue: asyncio.Queue[Event | BaseException]) -> None:
        self._engine = engine
        self._seq = seq
        self._queue = queue
        self._done = False
        self.request_id = seq.seq_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, FinalEvent):
            self._done = True
        return item

    def cancel(self) -> None:
        """Abort the request (no effect once it has finished)."""
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    async def final(self) -> FinalEvent:
        """Consume the stream and return its final event."""
        async for event in self:
            if isinstance(event, FinalEvent):
                return event
        raise RuntimeError("stream ended without a final event")


def _put_all(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    """On the consumer's loop: put one step's events into their streams' queues, in order."""
    for queue, item in items:
        queue.put_nowait(item)


class Engine:
    """Continuous-batching engine over one :class:`MiniGPT4`; see the module docstring."""

    def __init__(self, model: MiniGPT4, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(self.config.scheduler)
        self.runner = Runner(model, self.config.image_cache_size, self.config.prefix_reuse)
        self.metrics = EngineMetrics()
        self._lock = threading.Condition()
        self._seqs: dict[str, SeqState] = {}
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._aborted: set[str] = set()
        # events of this step, by the consumer's loop (worker thread only)
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.threads: ThreadSettings | None = None  # chosen at start()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self.threads = thread_settings(self.config.threads)
            log.info("engine: %s", self.threads.describe())
            if self.model.device.type == "cpu" and keep_freed_memory():
                log.info("engine: malloc keeps freed memory for reuse (model.engine.cpu_tuning)")
            self._thread = threading.Thread(target=self._work, name="minigpt4-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker; requests still queued or running end with ``aborted``."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    async def __aenter__(self) -> Engine:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    # ------------------------------------------------------------------ submitting

    def submit(self, request: EngineRequest) -> RequestStream:
        """Validate and queue ``request``; raises ``Busy``, ``RequestTooLarge``, ``RequestRejected`` or
        ``RequestFailed`` (the engine is not running)."""
        loop = asyncio.get_running_loop()
        if self._thread is None or self._stopping:
            raise RequestFailed("the engine is not running (call start() or use `async with Engine(...)`)")
        options = request.options or default_options(self.model)
        options.validate()
        if request.turns is not None:
            try:
                prompt = self.model.build_prompt(request.turns)
            except ValueError as exc:  # a bad role, an image on an assistant turn, a reserved marker in the text
                raise RequestRejected("invalid", str(exc)) from exc
        elif request.prompt is not None:
            prompt = request.prompt
        else:
            raise RequestRejected("invalid", "a request needs turns or a prompt")
        markers = prompt.count(IMAGE_PLACEHOLDER)
        if markers != len(request.images):
            raise RequestRejected(
                "invalid", f"the prompt has {markers} image placeholder(s) but {len(request.images)} image(s)"
            )
        segments = self.model.segment_token_ids(prompt)
        prompt_tokens = sum(len(s) for s in segments) + markers * self.model.spec.num_visual_tokens
        prompt_tokens = min(prompt_tokens, options.max_length - options.max_new_tokens)
        now = time.monotonic()
        seq = SeqState(
            request=request,
            options=options,
            prompt=prompt,
            segments=segments,
            prompt_tokens=prompt_tokens,
            submitted_at=now,
            deadline=now + request.deadline_s if request.deadline_s else None,
        )
        queue: asyncio.Queue[Any] = asyncio.Queue()
        info = SeqInfo(seq.seq_id, request.user, prompt_tokens, options.max_new_tokens, request.conversation_id)
        with self._lock:
            if seq.seq_id in self._seqs:
                raise RequestRejected("invalid", f"request id {seq.seq_id} is already in use")
            try:
                self.scheduler.add(info)
            except Busy:
                self.metrics.rejected_busy += 1
                raise
            self._seqs[seq.seq_id] = seq
            self._sinks[seq.seq_id] = (loop, queue)
            self.metrics.submitted += 1
            self._lock.notify_all()
        return RequestStream(self, seq, queue)

    def abort(self, request_id: str) -> None:
        """Abort a queued or running request; its stream ends with ``aborted``."""
        with self._lock:
            if request_id not in self._seqs:
                return
            self._aborted.add(request_id)
            self._lock.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """Current metrics (queue depth, batch size, throughput, TTFT, cache hit rates)."""
        with self._lock:
            return self.metrics.snapshot(
                queue_depth=self.scheduler.queue_depth,
                batch_size=self.runner.batch_size,
                image_cache=(self.runner.images.hits, self.runner.images.misses),
                prefix_cache=(self.runner.prefixes.hits, self.runner.prefixes.misses),
                reused_prefix_tokens=self.runner.prefixes.reused_tokens,
                cached_prefix_tokens=self.scheduler.cached_tokens,
            )

    # ------------------------------------------------------------------ worker

    def _emit(self, seq: SeqState, item: Any) -> None:
        """Queue an event for its stream; :meth:`_deliver` hands them over, one wake-up per event loop."""
        sink = self._sinks.get(seq.seq_id)
        if sink is None:
            return
        loop, queue = sink
        self._outbox.setdefault(loop, []).append((queue, item))

    def _deliver(self) -> None:
        """Send the queued events: one ``call_soon_threadsafe`` per event loop, not one per token."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            with contextlib.suppress(RuntimeError):  # the consumer's loop is closed
                loop.call_soon_threadsafe(_put_all, items)

    def _fail(self, seq: SeqState, error: BaseException) -> None:
        """End ``seq`` with an error: its stream raises ``error`` instead of a final event."""
        seq.finish_reason = "error"
        self._emit(seq, error)
        self._forget(seq)

    def _finish(self, seq: SeqState, reason: FinishReason) -> None:
        """End ``seq`` with its final event (text, ids, timings) and record it in the metrics."""
        seq.finish_reason = reason
        now = time.monotonic()
        final = FinalEvent(
            request_id=seq.seq_id,
            finish_reason=reason,
            text=decode_answer(self.model, seq.generated),
            token_ids=tuple(seq.generated),
            prompt_tokens=int(seq.context.shape[0]) if seq.context is not None else seq.prompt_tokens,
            completion_tokens=len(seq.generated),
            reused_prefix_tokens=seq.reused_prefix_tokens,
            queued_s=(seq.admitted_at or now) - seq.submitted_at,
            ttft_s=(seq.first_token_at - seq.submitted_at) if seq.first_token_at else None,
            total_s=now - seq.submitted_at,
        )
        self.metrics.record_finish(final)
        self._emit(seq, final)
        self._forget(seq)

    def _forget(self, seq: SeqState) -> None:
        with self._lock:
            self._seqs.pop(seq.seq_id, None)
            self._sinks.pop(seq.seq_id, None)
            self._aborted.discard(seq.seq_id)

    def _token(self, seq: SeqState, token: int) -> RowFinish | None:
        """Record a sampled token, emit it, and return the row's finish reason if it is done."""
        assert seq.sampler is not None
        reason = seq.sampler.finish_reason(self.model.decode_text)
        self._emit_token(seq, token, last=reason is not None)
        return reason

    def _emit_token(self, seq: SeqState, token: int, last: bool) -> None:
        """Append ``token`` to the answer and send its token event (``last``: flush held-back text)."""
        assert seq.detok is not None
        seq.generated.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
            self.metrics.record_ttft(seq.first_token_at - seq.submitted_at, follow_up=seq.reused_prefix_tokens > 0)
        text = seq.detok.push(token)
        if last:
            text += seq.detok.flush()
        self._emit(seq, TokenEvent(seq.seq_id, len(seq.generated) - 1, token, text))
        self.metrics.tokens += 1

    def _work(self) -> None:
        assert self.threads is not None
        apply_thread_settings(self.threads)  # here: torch's thread count is per thread (model.engine.threads)
        if self.model.device.type == "cpu":
            changed = lay_out_for_cpu(self.model)
            if changed:
                log.info("engine: %d linear weights laid out for the CPU GEMM (model.engine.cpu_tuning)", changed)
        while True:
            with self._lock:
                while not self._stopping and not self._has_work():
                    self._lock.wait(timeout=0.5)
                if self._stopping:
                    break
                dropped = self._drop_queued()
                plan = self.scheduler.schedule()
                admitted = [self._seqs[s] for s in plan.admit if s in self._seqs]
            for seq, reason in dropped:  # _finish takes the lock itself
                self._finish(seq, reason)
            self._deliver()
            if plan.empty and not self.runner.rows:
                with self._lock:
                    self._lock.wait(timeout=0.05)  # queued work that cannot start yet: do not spin
                continue
            try:
                self._step(plan.evict_prefixes, admitted)
            except Exception as exc:  # never let one bad step kill the worker
                log.exception("engine step failed; failing the running requests")
                self._fail_all_running(exc)
            self._deliver()
        self._shutdown()
        self._deliver()

    def _drop_queued(self) -> list[tuple[SeqState, FinishReason]]:
        """Take aborted and overdue requests out of the queue (deadlines bound queueing too); caller holds the lock."""
        now = time.monotonic()
        dropped: list[tuple[SeqState, FinishReason]] = []
        for seq_id, seq in list(self._seqs.items()):
            reason: FinishReason
            if seq_id in self._aborted:
                reason = "aborted"
            elif seq.deadline is not None and now > seq.deadline:
                reason = "deadline"
            else:
                continue
            if self.scheduler.abort(seq_id):  # False: it is running; _step removes it
                dropped.append((seq, reason))
        return dropped

    def _has_work(self) -> bool:
        return bool(self.scheduler.queue_depth or self.runner.rows or self._aborted)

    def _step(self, evict: tuple[str, ...], admitted: list[SeqState]) -> None:
        step_start = time.monotonic()
        self.runner.evict(evict)
        generated: dict[str, int] = {}
        done: list[SeqState] = []  # rows in the runner that end now
        gone: list[str] = []  # admitted sequences that never joined the batch
        for seq in admitted:
            seq.admitted_at = time.monotonic()
            try:
                self.runner.prepare(seq)
                if seq.options.num_beams > 1:
                    self._beam(seq)
                    gone.append(seq.seq_id)
                    continue
                self.runner.prefill(seq)  # staged: all of them are prefilled together below
            except Exception as exc:  # this request only: the others in the step go on
                self._fail(seq, self._request_error(seq, exc))
                gone.append(seq.seq_id)
        for seq, result in self.runner.run_prefills():
            if isinstance(result, Exception):
                self._fail(seq, self._request_error(seq, result))
                gone.append(seq.seq_id)
                continue
            generated[seq.seq_id] = 1
            if reason := self._token(seq, result):
                seq.finish_reason = reason
                done.append(seq)
        # the scheduler released the cached prefix of every admitted conversation; drop it where prefill didn't take it
        self.runner.evict([s.request.conversation_id or "" for s in admitted if s.seq_id in gone])
        now = time.monotonic()
        for seq in self.runner.rows:
            if seq in done:
                continue
            if seq.seq_id in self._aborted:
                seq.finish_reason = "aborted"
                done.append(seq)
            elif seq.deadline is not None and now > seq.deadline:
                seq.finish_reason = "deadline"
                done.append(seq)
        self._retire(done, gone, generated)
        self._deliver()  # the first tokens go out before the decode step
        if self.runner.rows:
            generated, done = {}, []
            for seq, token in zip(list(self.runner.rows), self.runner.decode(), strict=True):
                generated[seq.seq_id] = 1
                if reason := self._token(seq, token):
                    seq.finish_reason = reason
                    done.append(seq)
            self._retire(done, [], generated)
        self.metrics.record_step(self.runner.batch_size, time.monotonic() - step_start)

    def _retire(self, done: list[SeqState], gone: list[str], generated: dict[str, int]) -> None:
        """Remove ended rows (keeping their KV as prefixes), send their final events, tell the scheduler."""
        kept = self.runner.remove(done)
        for seq in done:
            reason = seq.finish_reason or "eos"
            if reason == "error":  # never here: failed rows end through _fail
                raise RuntimeError(f"request {seq.seq_id} failed but was retired as finished")
            self._finish(seq, reason)
        with self._lock:
            finished = tuple([s.seq_id for s in done] + gone)
            self.scheduler.update(StepResult(generated=generated, finished=finished, cached_prefixes=kept))

    def _beam(self, seq: SeqState) -> None:
        """Beam search runs alone (slower, documented): its tokens stream as token events once it has ended."""
        assert seq.context is not None  # already truncated by the runner
        result = beam_search(self.model, seq.context, seq.options)
        for i, token in enumerate(result.token_ids):
            self._emit_token(seq, token, last=i == len(result.token_ids) - 1)
        self._finish(seq, result.finish_reason)

    @staticmethod
    def _request_error(seq: SeqState, exc: Exception) -> EngineError:
        """The contract error for a failure while preparing one request (logged; its stream raises it)."""
        if isinstance(exc, EngineError):
            log.warning("request %s rejected: %s", seq.seq_id, exc)
            return exc
        log.error("request %s failed", seq.seq_id, exc_info=exc)
        error = RequestFailed(f"preparing the request failed: {exc!r}")
        error.__cause__ = exc
        return error

    def _fail_all_running(self, exc: Exception) -> None:
        rows = list(self.runner.rows)
        for seq in rows:
            seq.finish_reason = "error"
        try:
            self.runner.remove(rows)
        except Exception:
            self.runner.reset()
        for seq in rows:
            error = RequestFailed(f"engine step failed: {exc!r}")
            error.__cause__ = exc
            self._fail(seq, error)
        with self._lock:
            self.scheduler.update(StepResult(finished=tuple(s.seq_id for s in rows)))

    def _shutdown(self) -> None:
        for seq in list(self.runner.rows):
            self._finish(seq, "aborted")
        with self._lock:
            pending = list(self._seqs.values())
        for seq in pending:
            self._finish(seq, "aborted")

    async def generate(self, request: EngineRequest) -> FinalEvent:
        """Convenience: submit and wait for the final event."""
        return await self.submit(request).final()

    async def stream_text(self, request: EngineRequest) -> AsyncIterator[str]:
        """Convenience: the answer's text deltas."""
        async with self.submit(request) as stream:
            async for event in stream:
                if isinstance(event, TokenEvent) and event.text:
                    yield event.text
