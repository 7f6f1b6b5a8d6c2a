"""Iteration-level scheduling in plain Python: admission, fairness, KV budget, backpressure.

The scheduler never touches tensors (vLLM's ``v1/core/sched`` split): it sees sequences as
token counts and decides, once per engine step, which queued sequences join the running
batch and which cached conversation prefixes to evict.  The runner owns the tensors and
reports back what each step produced.

Interface (called by the engine under one lock):

* :meth:`Scheduler.add` — queue a sequence, or raise :class:`~model.engine.contract.Busy` when the
  estimated wait or a queue limit is exceeded (a flooding user hits their own per-user limit
  first) and :class:`~model.engine.contract.RequestTooLarge` when it can never fit the KV budget.
* :meth:`Scheduler.schedule` → :class:`StepPlan` — sequences to admit this step (round-robin
  over users, within the batch size, the per-user running cap and the KV token budget) and
  prefixes to evict (least recently used first) to make room.
* :meth:`Scheduler.update` with a :class:`StepResult` — tokens produced, sequences finished,
  conversation prefixes now resident.
* :meth:`Scheduler.abort` — drop a queued sequence (running ones are removed by the runner
  and reported as finished).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from model.engine.contract import Busy, RequestTooLarge

__all__ = ["Scheduler", "SchedulerConfig", "SeqInfo", "StepPlan", "StepResult"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits; see ``[engine]`` in bot.toml for the documented defaults."""

    max_batch: int = 16  # rows decoded together
    max_prefills_per_step: int = 4  # new sequences prefilled between two decode steps (bounds decode stalls)
    max_queue: int = 256  # queued sequences, all users
    max_queued_per_user: int = 8
    max_running_per_user: int = 4
    max_wait_s: float = 30.0  # estimated queueing time above which add() raises Busy
    kv_budget_tokens: int = 65_536  # running reservations + cached conversation prefixes
    initial_request_s: float = 5.0  # service-time guess before any request has finished


@dataclass
class SeqInfo:
    """What the scheduler knows about one sequence: sizes, owner, and its conversation prefix key."""

    seq_id: str
    user: str
    prompt_tokens: int
    max_new_tokens: int
    prefix_key: str | None = None
    generated: int = 0
    admitted_at: float | None = None

    @property
    def reserve(self) -> int:
        """KV tokens this sequence may occupy at most."""
        return self.prompt_tokens + self.max_new_tokens


@dataclass(frozen=True)
class StepPlan:
    """One iteration: sequences to prefill and join the batch, rows to decode, prefixes to drop."""

    admit: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    evict_prefixes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.admit or self.decode or self.evict_prefixes)


@dataclass(frozen=True)
class StepResult:
    """What the runner did with a plan."""

    generated: Mapping[str, int] = field(default_factory=dict)  # seq_id → tokens produced this step
    finished: tuple[str, ...] = ()
    cached_prefixes: Mapping[str, int] = field(default_factory=dict)  # prefix_key → tokens now resident
    dropped_prefixes: tuple[str, ...] = ()  # prefixes the runner consumed or could not keep


class Scheduler:
    """Plain-Python scheduler; not thread-safe on its own (the engine holds a lock)."""

    def __init__(self, config: SchedulerConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or SchedulerConfig()
        self.clock = clock
        self.queues: OrderedDict[str, deque[SeqInfo]] = OrderedDict()  # user → FIFO, in round-robin order
        self.running: dict[str, SeqInfo] = {}
        self.prefixes: OrderedDict[str, int] = OrderedDict()  # key → tokens, least recently used first
        self._avg_request_s = self.config.initial_request_s
        self._pending_evictions: list[str] = []  # prefixes dropped in update(), told to the runner next plan
        self.finished_count = 0

    # ------------------------------------------------------------------ queries

    @property
    def queue_depth(self) -> int:
        return sum(len(q) for q in self.queues.values())

    @property
    def reserved_tokens(self) -> int:
        return sum(s.reserve for s in self.running.values())

    @property
    def cached_tokens(self) -> int:
        return sum(self.prefixes.values())

    def running_for(self, user: str) -> int:
        return sum(1 for s in self.running.values() if s.user == user)

    def estimated_wait_s(self, ahead: int | None = None) -> float:
        """Queueing time for a new arrival: waves of ``max_batch`` requests, each an average request long."""
        ahead = self.queue_depth if ahead is None else ahead
        free = self.config.max_batch - len(self.running)
        if ahead < free:
            return 0.0
        waves = (ahead - free) // self.config.max_batch + 1
        return waves * self._avg_request_s

    # ------------------------------------------------------------------ interface

    def add(self, seq: SeqInfo) -> None:
        """Queue ``seq`` or raise :class:`Busy` / :class:`RequestTooLarge`."""
        cfg = self.config
        if seq.reserve > cfg.kv_budget_tokens:
            raise RequestTooLarge(
                f"the conversation needs {seq.reserve} tokens of context + answer, more than the engine's "
                f"KV budget of {cfg.kv_budget_tokens}"
            )
        user_queue = self.queues.get(seq.user)
        wait = self.estimated_wait_s()
        if user_queue is not None and len(user_queue) >= cfg.max_queued_per_user:
            raise Busy(f"user {seq.user!r} already has {len(user_queue)} questions waiting", max(wait, 1.0))
        if self.queue_depth >= cfg.max_queue:
            raise Busy(f"queue full ({cfg.max_queue})", max(wait, 1.0))
        if wait > cfg.max_wait_s:
            raise Busy(f"estimated wait {wait:.1f} s exceeds {cfg.max_wait_s:.0f} s", wait)
        self.queues.setdefault(seq.user, deque()).append(seq)

    def abort(self, seq_id: str) -> bool:
        """Remove a queued sequence; returns ``False`` if it is running (the runner must drop it)."""
        for user, queue in list(self.queues.items()):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    if not queue:
                        del self.queues[user]
                    return True
        return False

    def schedule(self) -> StepPlan:
        """Pick sequences to admit (round-robin over users) and prefixes to evict for room."""
        cfg = self.config
        admit: list[str] = []
        evict: list[str] = self._pending_evictions
        self._pending_evictions = []
        while len(self.running) < cfg.max_batch and len(admit) < cfg.max_prefills_per_step:
            seq = self._next_candidate()
            if seq is None:
                break
            own = self.prefixes.get(seq.prefix_key, 0) if seq.prefix_key else 0
            needed = self.reserved_tokens + self.cached_tokens - own + seq.reserve - cfg.kv_budget_tokens
            victims: list[str] = []
            for key, tokens in self.prefixes.items():  # least recently used first
                if needed <= 0:
                    break
                if key != seq.prefix_key:
                    victims.append(key)
                    needed -= tokens
            if needed > 0:
                break  # cannot fit yet: evict nothing, wait for running sequences; keeps its place at the head
            for key in victims:
                del self.prefixes[key]
            evict.extend(victims)
            self._pop(seq)
            if seq.prefix_key is not None and seq.prefix_key in self.prefixes:
                del self.prefixes[seq.prefix_key]  # the running reservation now holds those tokens
            seq.admitted_at = self.clock()
            self.running[seq.seq_id] = seq
            admit.append(seq.seq_id)
        decode = tuple(s for s in self.running if s not in admit)
        return StepPlan(tuple(admit), decode, tuple(evict))

    def update(self, result: StepResult) -> None:
        """Account for one executed step."""
        for seq_id, count in result.generated.items():
            if seq_id in self.running:
                self.running[seq_id].generated += count
        now = self.clock()
        for seq_id in result.finished:
            seq = self.running.pop(seq_id, None)
            if seq is not None and seq.admitted_at is not None:
                self._avg_request_s = 0.8 * self._avg_request_s + 0.2 * max(now - seq.admitted_at, 1e-3)
                self.finished_count += 1
        for key in result.dropped_prefixes:
            self.prefixes.pop(key, None)
        for key, tokens in result.cached_prefixes.items():
            self.prefixes.pop(key, None)
            self.prefixes[key] = tokens  # most recently used at the end
        self._enforce_budget_on_cache()

    def touch_prefix(self, key: str) -> None:
        """Mark a cached prefix as recently used."""
        if key in self.prefixes:
            self.prefixes.move_to_end(key)

    # ------------------------------------------------------------------ helpers

    def _next_candidate(self) -> SeqInfo | None:
        for user, queue in self.queues.items():
            if queue and self.running_for(user) < self.config.max_running_per_user:
                return queue[0]
        return None

    def _pop(self, seq: SeqInfo) -> None:
        queue = self.queues[seq.user]
        queue.popleft()
        del self.queues[seq.user]
        if queue:
            self.queues[seq.user] = queue  # back of the round-robin order

    def _enforce_budget_on_cache(self) -> None:
        while self.prefixes and self.reserved_tokens + self.cached_tokens > self.config.kv_budget_tokens:
            key, _ = self.prefixes.popitem(last=False)
            self._pending_evictions.append(key)
