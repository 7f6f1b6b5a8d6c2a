"""The ``vllm`` backend end to end: a real vLLM worker (the CPU wheel in ``.venv-vllm``), the bot's backend API.

One worker is started for the whole module (vLLM start-up is the slow part, ~20 s on 2 cores), by the
backend itself (``[vllm] url = ""``), on tiny demo weights with head_dim 64 (vLLM's CPU attention refuses
the parity fixtures' 16).  Until the MiniGPT-4 vLLM model is exported here the worker serves the demo
LLM folder as a plain LLaMA, so these threads carry no picture; the ids are compared with the local engine
running the same LLM weights in float32.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bot.cli.backends import LOCAL
from bot.cli.vllm_backend import VLLM, VllmBackend
from bot.core.config import Settings
from model.engine.api import Busy, ChatTurn, FinalEvent, RequestFailed, TokenEvent

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
if not VLLM_PYTHON.is_file():
    pytest.skip("no vLLM environment: ./scripts/setup.sh --vllm (or --dev) creates .venv-vllm", allow_module_level=True)

T = TypeVar("T")
GREEDY = {"do_sample": False, "max_new_tokens": 24, "repetition_penalty": 1.05}
FIRST: list[ChatTurn] = [
    {
        "role": "user",
        "text": "Describe the colours of a quiet harbour at dawn, please: the water, "
        "the boats, the sky, the gulls and the old stone walls of the harbour office.",
    }
]


class Loop:
    """One event loop in a thread for the module: both backends (and their HTTP sessions) live on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from model.demo_weights import DemoSizes, write_demo_weights

    folder = tmp_path_factory.mktemp("vllm")
    weights = write_demo_weights(folder / "w", "vicuna0", sizes=DemoSizes(llm_hidden=128, llm_heads=2,
                                                                             llm_intermediate=256))  # fmt: skip
    model = {**weights.loader_kwargs(), "device": "cpu", "dtype": "float32"}
    model.pop("variant", None)
    common = {"data_dir": str(folder / "data"), "model": model, "generation": GREEDY}
    vllm = {"model_dir": str(weights.llm), "dtype": "float32", "threads": 2, "kv_cache_gib": 0.5, "max_num_seqs": 8,
            "max_model_len": 2048, "enforce_eager": True, "max_wait_s": 120}  # fmt: skip
    loop = Loop()
    local = loop.run(LOCAL.start(Settings.model_validate(common)))
    settings = Settings.model_validate({**common, "engine": {"backend": "vllm"}, "vllm": vllm})
    backend = loop.run(VLLM.start(settings))
    try:
        yield {"loop": loop, "local": local, "vllm": backend, "settings": settings, "vllm_table": vllm}
    finally:
        loop.run(backend.close())
        loop.run(local.close())
        loop.loop.call_soon_threadsafe(loop.loop.stop)


async def drain(backend: Any, turns: list[ChatTurn], conversation: str, **options: Any) -> list[Any]:
    stream = backend.stream(turns=turns, images=[], conversation_id=conversation, user=conversation,
                            options=GREEDY | options)  # fmt: skip
    return [event async for event in stream]


def final(events: list[Any]) -> FinalEvent:
    assert isinstance(events[-1], FinalEvent) and all(isinstance(e, TokenEvent) for e in events[:-1])
    return events[-1]


def same_answer(local: list[Any], vllm: list[Any]) -> None:
    a, b = final(local), final(vllm)
    assert b.token_ids == a.token_ids
    assert b.text == a.text and b.finish_reason == a.finish_reason
    assert [e.text for e in vllm[:-1]] == [e.text for e in local[:-1]]  # the same streamed deltas


def test_vllm_greedy_ids_equal_the_local_engine_one_turn_and_with_a_strong_penalty(env: dict[str, Any]) -> None:
    """Penalty 1.05 and 1.6: vLLM's own penalty (prompt tokens too) would change these ids; the reference's
    generated-only penalty (the worker's logits processor) keeps them equal."""
    for penalty in (1.05, 1.6):
        local = env["loop"].run(drain(env["local"], FIRST, f"one-{penalty}", repetition_penalty=penalty))
        vllm = env["loop"].run(drain(env["vllm"], FIRST, f"one-{penalty}", repetition_penalty=penalty))
        same_answer(local, vllm)


def test_vllm_two_turn_thread_equals_the_local_engine_and_reuses_the_prefix(env: dict[str, Any]) -> None:
    loop = env["loop"]
    first = final(loop.run(drain(env["local"], FIRST, "two")))
    turns: list[ChatTurn] = [*FIRST, {"role": "assistant", "text": first.text},
                             {"role": "user", "text": "And what would a painter add to it?"}]  # fmt: skip
    loop.run(drain(env["vllm"], FIRST, "two"))
    local, vllm = loop.run(drain(env["local"], turns, "two")), loop.run(drain(env["vllm"], turns, "two"))
    same_answer(local, vllm)
    assert final(vllm).prompt_tokens > 128  # longer than one of vLLM's 128-token CPU blocks
    assert final(vllm).reused_prefix_tokens >= 128  # vLLM's prefix cache: the first turn's full blocks
    assert final(vllm).prompt_tokens == final(local).prompt_tokens


def test_vllm_eight_concurrent_threads_equal_the_local_engine(env: dict[str, Any]) -> None:
    threads = [[{"role": "user", "text": f"Thread {i}: what is the weather like on planet number {i}?"}]
               for i in range(8)]  # fmt: skip

    async def all_of(backend: Any) -> list[list[Any]]:
        return list(await asyncio.gather(*(drain(backend, t, f"c{i}") for i, t in enumerate(threads))))

    local, vllm = env["loop"].run(all_of(env["local"])), env["loop"].run(all_of(env["vllm"]))
    for a, b in zip(local, vllm, strict=True):
        same_answer(a, b)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_vllm_closing_the_reply_aborts_the_request_and_frees_its_slot(env: dict[str, Any]) -> None:
    backend: VllmBackend = env["vllm"]
    loop = env["loop"]

    async def leave_early() -> dict[str, Any]:
        stream = backend.stream(turns=FIRST, images=[], conversation_id="leave", user="leave",
                                options=GREEDY | {"max_new_tokens": 1500, "max_length": 2000})  # fmt: skip
        for _ in range(3):
            await anext(stream)
        during = await backend.worker_stats()
        await stream.aclose()
        return during

    during = loop.run(leave_early())
    assert during["unfinished"] == 1 and during["running"] == 1
    wait_for(lambda: loop.run(backend.worker_stats())["unfinished"] == 0, 30, "the aborted request stayed")
    wait_for(lambda: loop.run(backend.worker_stats())["running"] == 0, 30, "vLLM kept running it")


def test_vllm_no_first_token_within_max_wait_is_busy(env: dict[str, Any]) -> None:
    """A second bot process attaching by url; its max_wait_s is shorter than any answer's first token."""
    loop, backend = env["loop"], env["vllm"]
    table = env["vllm_table"] | {"url": backend.url, "max_wait_s": 0.001}
    settings = env["settings"].model_copy(update={"vllm": table})
    other = loop.run(VLLM.start(Settings.model_validate(settings.model_dump())))
    try:
        with pytest.raises(Busy):
            loop.run(drain(other, FIRST, "busy"))
    finally:
        loop.run(other.close())
    wait_for(lambda: loop.run(backend.worker_stats())["unfinished"] == 0, 30, "the Busy request was not aborted")


def test_vllm_worker_killed_mid_answer_fails_the_turn_then_recovers(env: dict[str, Any]) -> None:
    loop, backend = env["loop"], env["vllm"]
    assert loop.run(backend.problem()) is None
    pid = backend.worker.process.pid

    async def killed() -> None:
        stream = backend.stream(turns=FIRST, images=[], conversation_id="kill", user="kill",
                                options=GREEDY | {"max_new_tokens": 1500, "max_length": 2000})  # fmt: skip
        await anext(stream)
        os.killpg(pid, 9)
        async for _ in stream:
            pass

    with pytest.raises(RequestFailed):
        loop.run(killed())
    assert loop.run(backend.problem()) is not None  # /readyz: 503
    with pytest.raises(RequestFailed):  # still down: a clear "try again", not a hang
        loop.run(drain(backend, FIRST, "down"))
    wait_for(lambda: backend.worker.process.pid != pid and loop.run(backend.problem()) is None, 240,
             "the worker was not started again")  # fmt: skip
    same_answer(loop.run(drain(env["local"], FIRST, "back")), loop.run(drain(backend, FIRST, "back")))
