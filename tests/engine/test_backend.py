"""The local generation backend (``EngineBackend``) on the tiny demo weights: what the bot core sees.

It streams the contract's events, raises only ``EngineError`` subclasses (wrapping anything
unexpected in ``RequestFailed``), describes the model, reports engine stats and closes the engine.  What every
backend must do (the stream's shape, ``aclose``, invalid options, a bad picture) is the backend contract suite,
``tests/contracts/test_backend_contract.py``; this module keeps what is the local backend's own.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest
from engine_helpers import PICTURE, WAIT, alone_ids, user

from model.engine import (
    Busy,
    Engine,
    EngineBackend,
    EngineConfig,
    EngineError,
    FinalEvent,
    RequestFailed,
    RequestRejected,
    RequestTooLarge,
    SchedulerConfig,
    TokenEvent,
)
from model.engine.contract import ChatTurn
from model.generate import decode_answer, default_options

GREEDY = {"do_sample": False, "max_new_tokens": 8, "repetition_penalty": 1.0}
TURNS: list[ChatTurn] = [{"role": "user", "text": "What is this?", "image": True}]


async def _drain(backend: EngineBackend, **kw) -> list[TokenEvent | FinalEvent]:
    args = {"turns": TURNS, "images": [PICTURE], "conversation_id": "c1", "user": "u1", "options": GREEDY} | kw
    return [event async for event in backend.stream(**args)]


def run(m, main, config: EngineConfig | None = None, **backend_kw):
    """Run ``main(backend)`` against a started engine; the backend closes it at the end."""

    async def outer():
        backend = EngineBackend(Engine(m, config).start(), **backend_kw)
        try:
            return await asyncio.wait_for(main(backend), WAIT)
        finally:
            await backend.close()

    return asyncio.run(outer())


def test_stream_takes_exactly_the_core_s_keyword_arguments() -> None:
    params = inspect.signature(EngineBackend.stream).parameters
    assert [p for p in params if p != "self"] == ["turns", "images", "conversation_id", "user", "options"]
    assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in params if p != "self")


def test_stream_yields_token_events_then_one_final_event(m) -> None:
    events = run(m, _drain)
    tokens, final = events[:-1], events[-1]
    assert all(type(e) is TokenEvent for e in tokens) and type(final) is FinalEvent
    assert final.finish_reason in {"length", "eos", "stop"} and final.completion_tokens == len(tokens) >= 1
    assert "".join(t.text for t in tokens) == final.text == decode_answer(m, final.token_ids)
    # the [generation] settings plus the variant's stop strings, as a lone request would run them
    expected = alone_ids(m, [user("What is this?")], [PICTURE], default_options(m, **GREEDY))
    assert list(final.token_ids) == expected


def test_the_request_timeout_ends_the_answer_as_a_deadline(m) -> None:
    endless = {"do_sample": False, "max_new_tokens": 1500, "min_length": 1501, "max_length": 3000}
    events = run(m, lambda b: _drain(b, options=endless, turns=TURNS), timeout_s=0.05)
    assert events[-1].finish_reason == "deadline" and 1 <= events[-1].completion_tokens < 1500


def test_a_thread_too_large_for_the_kv_budget_is_rejected(m) -> None:
    async def main(backend):
        with pytest.raises(RequestTooLarge) as info:
            await _drain(backend)
        return info.value

    error = run(m, main, EngineConfig(scheduler=SchedulerConfig(kv_budget_tokens=40)))
    assert isinstance(error, RequestRejected) and error.reason == "too_large"


def test_busy_passes_through_with_its_retry_hint(m) -> None:
    config = EngineConfig(scheduler=SchedulerConfig(max_batch=1, max_queue=1))
    endless = {"do_sample": False, "max_new_tokens": 1500, "min_length": 1501, "max_length": 3000}

    async def main(backend):
        hog = backend.stream(turns=TURNS, images=[PICTURE], conversation_id="a", user="a", options=endless)
        await hog.__anext__()  # running
        waiting = backend.stream(turns=TURNS, images=[PICTURE], conversation_id="b", user="b", options=endless)
        waiting_task = asyncio.create_task(waiting.__anext__())  # queued: fills the queue of one
        await asyncio.sleep(0.05)
        with pytest.raises(Busy) as info:
            await _drain(backend, user="c")
        waiting_task.cancel()
        await hog.aclose()
        return info.value

    error = run(m, main, config)
    assert error.retry_after_s >= 1 and "queue full" in error.reason


def test_anything_unexpected_becomes_request_failed_and_is_logged(m, monkeypatch, caplog) -> None:
    async def main(backend):
        def broken(request):
            raise KeyError("simulated")

        monkeypatch.setattr(backend.engine, "submit", broken)
        with pytest.raises(EngineError) as info:
            await _drain(backend)
        return info.value

    with caplog.at_level(logging.ERROR, logger="model.engine.local_backend"):
        error = run(m, main)
    assert type(error) is RequestFailed and isinstance(error.__cause__, KeyError)
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


def test_describe_stats_and_close(m) -> None:
    async def main(backend):
        await _drain(backend)
        described, stats = backend.describe(), backend.stats()
        await backend.close()
        stopped = backend.engine._thread is None
        with pytest.raises(RequestFailed, match="not running"):
            await _drain(backend)
        return described, stats, stopped

    described, stats, stopped = run(m, main, info={"demo": True})
    assert described == {"variant": "vicuna0", "device": "cpu", "dtype": "float32", "demo": True}
    assert stats["finished"] == 1 and stats["queue_depth"] == 0 and "tokens_per_s" in stats
    assert stopped
