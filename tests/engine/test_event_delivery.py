"""The worker hands a step's events to the event loop in one wake-up, not one per token.

The loop is a ``SelectorEventLoop`` subclass that counts ``call_soon_threadsafe``: eight rows of ten
tokens (88 events) cross in about two calls per step, and every stream still sees its events in order.
"""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import collect, user

from model.engine import Engine, EngineConfig, EngineRequest, SchedulerConfig
from model.generate import default_options


class CountingLoop(asyncio.SelectorEventLoop):
    """An ordinary event loop that counts the wake-ups other threads ask for."""

    def __init__(self) -> None:
        super().__init__()
        self.threadsafe_calls = 0

    def call_soon_threadsafe(self, callback, *args, context=None):  # type: ignore[no-untyped-def]
        self.threadsafe_calls += 1
        return super().call_soon_threadsafe(callback, *args, context=context)


@pytest.fixture(scope="module")
def m(parity_model):
    return parity_model


def test_one_wake_up_per_step_carries_every_row_s_token(m) -> None:
    options = default_options(m, do_sample=False, max_new_tokens=10, min_length=11, repetition_penalty=1.0)
    requests = [
        EngineRequest(turns=[user(f"Question {i}?", image=False)], options=options, user=f"u{i}", request_id=f"r{i}")
        for i in range(8)
    ]
    config = EngineConfig(scheduler=SchedulerConfig(max_prefills_per_step=8, max_running_per_user=8))

    async def main() -> tuple[list, int]:
        async with Engine(m, config) as eng:
            loop = asyncio.get_running_loop()
            assert isinstance(loop, CountingLoop)
            with eng._lock:  # all eight are admitted in one step
                streams = [eng.submit(r) for r in requests]
            before = loop.threadsafe_calls
            results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 60)
            return results, loop.threadsafe_calls - before

    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        results, calls = runner.run(main())
    assert all(final.completion_tokens == 10 for _, final in results)  # collect() checked the order
    assert calls <= 2 * 11  # a prefill and ten decode steps; it was one call per event (88)
