"""The engine's scheduler on its own: plain Python, a fake clock, no tensors.

Covers admission within ``max_batch``, round-robin fairness between users, the per-user
running cap, backpressure (``Busy`` from the per-user queue, the global queue and the
estimated wait), ``RequestTooLarge``, the KV token budget (running reservations plus
cached conversation prefixes, LRU eviction, a request's own prefix), abort, and the
moving average of request durations behind the wait estimate.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from model.engine.contract import Busy, EngineError, RequestRejected, RequestTooLarge
from model.engine.scheduler import Scheduler, SchedulerConfig, SeqInfo, StepResult


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(clock: FakeClock | None = None, **overrides: float) -> Scheduler:
    # most tests are about neither the wait estimate nor the prefill rate limit
    values = {"max_wait_s": 1e9, "max_prefills_per_step": 1000} | overrides
    return Scheduler(SchedulerConfig(**values), clock=clock or FakeClock())


def seq(seq_id: str, user: str = "u", prompt: int = 10, new: int = 10, prefix: str | None = None) -> SeqInfo:
    return SeqInfo(seq_id, user, prompt, new, prefix)


def add_for(s: Scheduler, **per_user: int) -> None:
    """Queue ``n`` requests per user in turn, named after the user: ``add_for(s, A=2)`` adds ``a0``, ``a1``."""
    for user, n in per_user.items():
        for i in range(n):
            s.add(seq(f"{user.lower()}{i}", user=user))


def test_scheduler_module_imports_no_tensor_library() -> None:
    """The standard library, plus the torch-free contract for its errors (``Busy``, ``RequestTooLarge``)."""
    import model.engine.scheduler as mod

    tree = ast.parse(Path(mod.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    stdlib = {"__future__", "time", "collections", "collections.abc", "dataclasses"}
    assert imported <= stdlib | {"model.engine.contract"}, imported


def test_admission_up_to_max_batch_then_decode_and_refill() -> None:
    s = make(max_batch=3)
    for i in range(5):
        s.add(seq(f"s{i}", user=f"user{i}"))
    plan = s.schedule()
    assert plan.admit == ("s0", "s1", "s2")
    assert plan.decode == ()
    assert not plan.empty
    assert s.queue_depth == 2 and set(s.running) == {"s0", "s1", "s2"}

    plan = s.schedule()  # nothing finished: no room
    assert plan.admit == ()
    assert plan.decode == ("s0", "s1", "s2")

    s.update(StepResult(generated={"s0": 1, "s1": 1, "s2": 1}, finished=("s1",)))
    assert s.running["s0"].generated == 1
    plan = s.schedule()
    assert plan.admit == ("s3",)
    assert set(plan.decode) == {"s0", "s2"}
    assert s.queue_depth == 1


def test_empty_scheduler_plans_nothing() -> None:
    s = make()
    plan = s.schedule()
    assert plan.empty and plan.admit == plan.decode == plan.evict_prefixes == ()


def test_prefills_per_step_are_limited() -> None:
    s = make(max_batch=8, max_prefills_per_step=2)
    for i in range(5):
        s.add(seq(f"s{i}", user=f"u{i}"))
    assert s.schedule().admit == ("s0", "s1")
    plan = s.schedule()
    assert plan.admit == ("s2", "s3") and plan.decode == ("s0", "s1")
    assert s.schedule().admit == ("s4",)


def test_round_robin_admits_the_late_user_in_the_first_wave() -> None:
    s = make(max_batch=4, max_running_per_user=4)
    add_for(s, A=6, B=1)
    plan = s.schedule()
    assert plan.admit == ("a0", "b0", "a1", "a2")
    assert plan.admit.index("b0") < plan.admit.index("a1")
    assert [q.seq_id for q in s.queues["A"]] == ["a3", "a4", "a5"]
    assert "B" not in s.queues


def test_round_robin_alternates_between_users_with_many_requests() -> None:
    s = make(max_batch=6, max_running_per_user=6)
    add_for(s, A=4, B=4)
    assert s.schedule().admit == ("a0", "b0", "a1", "b1", "a2", "b2")


def test_max_running_per_user_caps_a_flooding_user() -> None:
    s = make(max_batch=8, max_running_per_user=2)
    add_for(s, A=6, B=1)
    plan = s.schedule()
    assert plan.admit == ("a0", "b0", "a1")  # batch has room, but A is at its cap
    assert s.running_for("A") == 2 and s.running_for("B") == 1
    assert s.schedule().admit == ()
    s.update(StepResult(finished=("a0",)))
    assert s.schedule().admit == ("a2",)
    assert s.running_for("A") == 2


def test_per_user_queue_limit_hits_only_the_flooding_user() -> None:
    s = make(max_batch=1, max_queued_per_user=3)
    add_for(s, A=3)
    with pytest.raises(Busy) as info:
        s.add(seq("a3", user="A"))
    assert "'A'" in info.value.reason
    assert info.value.retry_after_s >= 1.0
    assert isinstance(info.value, EngineError) and not hasattr(info.value, "user_message")  # no user-facing text
    s.add(seq("b0", user="B"))  # another user can still queue
    assert s.queue_depth == 4
    assert [q.seq_id for q in s.queues["A"]] == ["a0", "a1", "a2"]


def test_global_queue_full_raises_busy() -> None:
    s = make(max_batch=1, max_queue=3, max_queued_per_user=8)
    for user in "abc":
        s.add(seq(f"s-{user}", user=user))
    with pytest.raises(Busy) as info:
        s.add(seq("s-d", user="d"))
    assert "queue full" in info.value.reason
    assert info.value.retry_after_s >= 1.0
    assert s.queue_depth == 3 and "d" not in s.queues


def test_estimated_wait_over_max_wait_raises_busy_with_retry_after() -> None:
    s = make(max_batch=2, initial_request_s=5.0, max_wait_s=8.0)
    assert s.estimated_wait_s() == 0.0
    s.add(seq("s0", user="a"))
    s.add(seq("s1", user="b"))
    assert s.estimated_wait_s() == pytest.approx(5.0)  # two ahead fill the two free slots: one wave
    s.add(seq("s2", user="c"))
    s.add(seq("s3", user="d"))
    assert s.estimated_wait_s() == pytest.approx(10.0)
    with pytest.raises(Busy) as info:
        s.add(seq("s4", user="e"))
    err = info.value
    assert err.retry_after_s == pytest.approx(10.0) and err.retry_after_s > 0
    assert "exceeds" in err.reason
    assert "retry in about 10 s" in str(err)
    assert s.queue_depth == 4


def test_request_too_large_for_the_kv_budget() -> None:
    s = make(kv_budget_tokens=100)
    with pytest.raises(RequestTooLarge) as info:
        s.add(seq("big", prompt=90, new=20))
    assert isinstance(info.value, RequestRejected) and info.value.reason == "too_large"
    assert "110" in info.value.detail and "100" in info.value.detail
    assert s.queue_depth == 0
    s.add(seq("fits", prompt=80, new=20))  # exactly the budget is fine
    assert s.schedule().admit == ("fits",)


def test_kv_budget_stops_admission_and_resumes_after_a_finish() -> None:
    s = make(max_batch=8, kv_budget_tokens=300)
    for i in range(4):
        s.add(seq(f"s{i}", user=f"u{i}", prompt=80, new=20))  # reserve 100 each
    s.add(seq("small", user="u9", prompt=5, new=5))
    plan = s.schedule()
    assert plan.admit == ("s0", "s1", "s2")
    assert s.reserved_tokens == 300
    # the head of the queue keeps its place: the small request behind it is not let past
    assert s.schedule().admit == ()
    assert [q.seq_id for q in s.queues["u3"]] == ["s3"]
    s.update(StepResult(finished=("s1",)))
    assert s.reserved_tokens == 200
    plan = s.schedule()
    assert plan.admit == ("s3",)
    assert s.queue_depth == 1  # "small" waits: 300 reserved again
    s.update(StepResult(finished=("s0",)))
    assert s.schedule().admit == ("small",)


def test_cached_prefixes_are_evicted_lru_first_to_make_room() -> None:
    s = make(max_batch=8, kv_budget_tokens=300)
    s.update(StepResult(cached_prefixes={"p1": 50}))
    s.update(StepResult(cached_prefixes={"p2": 50}))
    s.update(StepResult(cached_prefixes={"p3": 50}))
    s.touch_prefix("p1")  # p1 used again: p2 is now the least recently used
    assert list(s.prefixes) == ["p2", "p3", "p1"]
    assert s.cached_tokens == 150
    s.add(seq("x", prompt=200, new=50))  # needs 250: 100 of the 150 cached tokens must go
    plan = s.schedule()
    assert plan.admit == ("x",)
    assert plan.evict_prefixes == ("p2", "p3")
    assert list(s.prefixes) == ["p1"]
    assert s.reserved_tokens + s.cached_tokens == 300


def test_only_as_many_prefixes_as_needed_are_evicted() -> None:
    s = make(kv_budget_tokens=300)
    s.update(StepResult(cached_prefixes={"old": 60, "mid": 60, "new": 60}))
    s.add(seq("x", prompt=150, new=30))  # 180 + 180 = 360: one 60-token prefix must go
    plan = s.schedule()
    assert plan.evict_prefixes == ("old",)
    assert list(s.prefixes) == ["mid", "new"]


def test_prefixes_are_not_evicted_when_that_still_leaves_no_room() -> None:
    """Evicting only makes sense when it lets the request in; otherwise the cached turn is lost for nothing."""
    s = make(kv_budget_tokens=300)
    s.add(seq("running", user="a", prompt=180, new=20))
    assert s.schedule().admit == ("running",)
    s.update(StepResult(cached_prefixes={"conv": 50}))
    s.add(seq("waiting", user="b", prompt=130, new=20))  # 200 + 50 + 150 > 300, and 200 + 150 > 300 too
    plan = s.schedule()
    assert plan.admit == ()
    assert plan.evict_prefixes == (), "a prefix was evicted although the request still could not be admitted"
    assert dict(s.prefixes) == {"conv": 50}
    s.update(StepResult(finished=("running",)))
    plan = s.schedule()
    assert plan.admit == ("waiting",)
    assert plan.evict_prefixes == () and dict(s.prefixes) == {"conv": 50}  # 150 + 50 fit the budget


def test_own_conversation_prefix_is_not_evicted_for_it_and_is_released_on_admission() -> None:
    s = make(kv_budget_tokens=300)
    s.update(StepResult(cached_prefixes={"conv": 100}))  # the oldest entry
    s.update(StepResult(cached_prefixes={"other": 100}))
    s.add(seq("follow-up", prompt=200, new=50, prefix="conv"))
    plan = s.schedule()
    assert plan.admit == ("follow-up",)
    assert plan.evict_prefixes == ("other",)  # not "conv", although it is least recently used
    assert "conv" not in s.prefixes  # the running reservation now holds those tokens
    assert s.cached_tokens == 0 and s.reserved_tokens == 250


def test_own_prefix_counts_as_room_for_its_follow_up() -> None:
    s = make(kv_budget_tokens=300)
    s.update(StepResult(cached_prefixes={"conv": 200}))
    s.add(seq("follow-up", prompt=230, new=50, prefix="conv"))  # 280 fits once conv's 200 are released
    plan = s.schedule()
    assert plan.admit == ("follow-up",)
    assert plan.evict_prefixes == ()
    assert s.prefixes == {}


def test_update_registers_cached_prefixes_and_enforces_the_budget() -> None:
    s = make(kv_budget_tokens=300)
    s.add(seq("r", prompt=150, new=50))
    assert s.schedule().admit == ("r",)
    s.update(StepResult(cached_prefixes={"a": 60}))
    assert dict(s.prefixes) == {"a": 60}
    s.update(StepResult(cached_prefixes={"b": 60}))  # 200 + 120 > 300: "a" (LRU) goes
    assert dict(s.prefixes) == {"b": 60}
    plan = s.schedule()
    assert plan.evict_prefixes == ("a",)  # the runner hears about it with the next plan
    assert plan.decode == ("r",)
    assert s.schedule().evict_prefixes == ()  # told once
    s.update(StepResult(cached_prefixes={"b": 70}))  # re-registered: size updated, most recent
    assert dict(s.prefixes) == {"b": 70}
    s.update(StepResult(dropped_prefixes=("b",)))
    assert s.prefixes == {} and s.schedule().evict_prefixes == ()


def test_update_ignores_unknown_and_repeated_finishes() -> None:
    s = make()
    s.add(seq("r"))
    s.schedule()
    s.update(StepResult(generated={"ghost": 3, "r": 2}, finished=("ghost",)))
    assert s.running["r"].generated == 2 and s.finished_count == 0
    s.update(StepResult(finished=("r",)))
    s.update(StepResult(finished=("r",)))
    assert s.finished_count == 1 and s.running == {}


def test_abort_queued_returns_true_and_it_is_never_admitted() -> None:
    s = make(max_batch=1)
    s.add(seq("run", user="a"))
    s.add(seq("q1", user="b"))
    s.add(seq("q2", user="b"))
    assert s.schedule().admit == ("run",)
    assert s.abort("q1") is True
    assert s.abort("q1") is False  # already gone
    assert s.abort("run") is False  # running: the runner must drop it
    assert "run" in s.running
    assert s.abort("nope") is False
    s.update(StepResult(finished=("run",)))
    admitted = []
    for _ in range(3):
        admitted += s.schedule().admit
        s.update(StepResult(finished=tuple(s.running)))
    assert admitted == ["q2"]


def test_abort_of_the_last_queued_request_of_a_user_drops_the_user_queue() -> None:
    s = make()
    s.add(seq("only", user="a"))
    assert s.abort("only")
    assert "a" not in s.queues and s.queue_depth == 0
    assert s.schedule().empty


def test_request_duration_ema_changes_the_wait_estimate() -> None:
    clock = FakeClock(0.0)
    s = make(clock, max_batch=1, initial_request_s=5.0)
    s.add(seq("s0"))
    assert s.schedule().admit == ("s0",)
    assert s.running["s0"].admitted_at == 0.0
    s.add(seq("s1"))
    assert s.estimated_wait_s() == pytest.approx(10.0)  # 1 running, 1 ahead: two waves of 5 s
    clock.t = 1.0
    s.update(StepResult(finished=("s0",)))
    assert s.finished_count == 1
    assert s.estimated_wait_s() == pytest.approx(0.8 * 5.0 + 0.2 * 1.0)  # one wave, shorter average
    assert s.schedule().admit == ("s1",)
    clock.t = 41.0  # a 40 s request
    s.update(StepResult(finished=("s1",)))
    assert s.estimated_wait_s(ahead=1) == pytest.approx(0.8 * 4.2 + 0.2 * 40.0)
    assert s.estimated_wait_s(ahead=0) == 0.0


def test_slow_requests_turn_into_busy_through_the_estimate() -> None:
    clock = FakeClock(0.0)
    s = make(clock, max_batch=1, initial_request_s=1.0, max_wait_s=10.0)
    s.add(seq("s0"))
    s.schedule()
    s.add(seq("s1"))  # estimate 2 s: accepted
    clock.t = 200.0
    s.update(StepResult(finished=("s0",)))  # average becomes 0.8 + 40 = 40.8 s
    s.schedule()  # s1 runs
    with pytest.raises(Busy) as info:
        s.add(seq("s2"))
    assert info.value.retry_after_s == pytest.approx(40.8)
    assert "retry in about 41 s" in str(info.value)
