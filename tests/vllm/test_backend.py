"""The ``vllm`` backend end to end, with pictures: a real vLLM worker (the CPU wheel in ``.venv-vllm``) serving
the exported MiniGPT-4, against the local engine (float32, the same files).

Each variant gets one worker, started once by the backend itself as ``serve`` starts it (``[vllm] url = ""``,
``model_dir = ""``: the backend exports ``[model]`` — tiny head_dim-32 demo weights in the original layouts —
into ``<data_dir>/vllm-model/<variant>`` and starts ``model.vllm_plugin.worker`` on it).  vicuna0 runs every
case (penalties, a two-turn thread with a second picture, 8 threads at once, prefix-cache hits, the picture
limit, abort, Busy, a killed worker); llama2 and MiniGPT-v2 run the answer cases only (one picture, the
two-turn thread with its prefix hits, 8 threads at once), since the rest is the same code whatever the model.
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
from PIL import Image, ImageDraw

from bot.cli.backends import LOCAL
from bot.cli.vllm_backend import VLLM, VllmBackend, cut_left
from bot.core.config import Settings
from model.engine.contract import Busy, ChatTurn, FinalEvent, RequestFailed, RequestTooLarge, TokenEvent
from tests.contracts.backend_contract import BackendContract, BackendDriver
from tests.pictures import encode_png
from tests.vllm.vllm_env import require_vllm

ROOT = Path(__file__).resolve().parents[2]
require_vllm()

T = TypeVar("T")
GREEDY = {"do_sample": False, "max_new_tokens": 24, "repetition_penalty": 1.05}
FIRST = (
    "Describe this picture in detail, please: the colours, the shapes, what stands in front and what "
    "lies behind, the light, and anything written on it, as carefully as you can. Then tell me where "
    "it might have been taken, in which season, and what happened just before."
)
SECOND = "And how does this second picture differ from the first one?"
LIMIT = 2  # [vllm] limit_mm_per_prompt in these tests: a three-picture thread exceeds it


def picture(i: int) -> bytes:
    """A distinct PNG per ``i`` (different colours and shapes, so different hashes and embeddings)."""
    image = Image.new("RGB", (320, 240), ((37 * i) % 256, (90 + 53 * i) % 256, (200 - 29 * i) % 256))
    draw = ImageDraw.Draw(image)
    draw.ellipse([30 + 9 * i, 40, 190 + 5 * i, 200], fill=((200 + 17 * i) % 256, (30 + 41 * i) % 256, 40))
    draw.polygon([(220, 200), (270, 30 + 11 * i), (310, 200)], fill=(240, 200, (60 * i) % 256))
    return encode_png(image)


class Loop:
    """One event loop in a thread for the module: both backends (and their HTTP sessions) live on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def start_pair(variant: str, folder: Path, device: str = "cpu", dtype: str = "float32") -> Iterator[dict[str, Any]]:
    """Demo weights of ``variant`` → the local engine, and the vLLM backend that exports them and starts a worker."""
    from model.demo_weights import write_demo_weights

    weights = write_demo_weights(folder / "w", variant)
    model = {k: v for k, v in weights.loader_kwargs().items() if v} | {"device": device, "dtype": dtype}
    common = {"data_dir": str(folder / "data"), "model": model, "generation": GREEDY}
    vllm = {"dtype": dtype, "threads": 2, "kv_cache_gib": 0.5, "max_num_seqs": 8, "max_model_len": 2048,
            "enforce_eager": True, "max_wait_s": 120, "limit_mm_per_prompt": LIMIT}  # fmt: skip
    if variant == "llama2":
        vllm["block_size"] = 32  # [vllm] block_size reaches the worker: smaller blocks, more of a follow-up reused
    loop = Loop()
    local = loop.run(LOCAL.start(Settings.model_validate(common)))
    settings = Settings.model_validate({**common, "engine": {"backend": "vllm"}, "vllm": vllm})
    backend = loop.run(VLLM.start(settings))
    try:
        yield {"variant": variant, "loop": loop, "local": local, "vllm": backend, "settings": settings,
               "vllm_table": vllm}  # fmt: skip
    finally:
        loop.run(backend.close())
        loop.run(local.close())
        loop.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """vicuna0: every case runs on this worker."""
    yield from start_pair("vicuna0", tmp_path_factory.mktemp("vllm-vicuna0"))


@pytest.fixture(scope="module", params=["vicuna0", "llama2", "minigptv2"])
def each(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """All three variants: vicuna0 is the module's ``env``; llama2 (64 picture tokens) and MiniGPT-v2 (448 px,
    256 picture tokens, LoRA merged) get one worker each, started once (pytest groups their tests)."""
    if request.param == "vicuna0":
        yield request.getfixturevalue("env")
    else:
        yield from start_pair(request.param, tmp_path_factory.mktemp(f"vllm-{request.param}"))


async def drain(backend: Any, turns: list[ChatTurn], images: list[bytes], conversation: str,
                **options: Any) -> list[Any]:  # fmt: skip
    stream = backend.stream(turns=turns, images=images, conversation_id=conversation, user=conversation,
                            options=GREEDY | options)  # fmt: skip
    return [event async for event in stream]


def final(events: list[Any]) -> FinalEvent:
    assert isinstance(events[-1], FinalEvent) and all(isinstance(e, TokenEvent) for e in events[:-1])
    return events[-1]


def same_answer(local: list[Any], vllm: list[Any]) -> None:
    a, b = final(local), final(vllm)
    diverged = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y), None)
    assert b.token_ids == a.token_ids, f"ids diverge at generated token {diverged}: {a.token_ids} vs {b.token_ids}"
    assert b.text == a.text and b.finish_reason == a.finish_reason
    assert [e.text for e in vllm[:-1]] == [e.text for e in local[:-1]]  # the same streamed deltas
    assert b.prompt_tokens == a.prompt_tokens  # vLLM expanded each picture to the local engine's token count


def one_picture(pair: dict[str, Any], conversation: str, **options: Any) -> tuple[list[Any], list[Any]]:
    turns: list[ChatTurn] = [{"role": "user", "text": FIRST, "image": True}]
    loop = pair["loop"]
    local = loop.run(drain(pair["local"], turns, [picture(0)], conversation, **options))
    vllm = loop.run(drain(pair["vllm"], turns, [picture(0)], conversation, **options))
    return local, vllm


def expanded(backend: VllmBackend, turns: list[ChatTurn], images: list[bytes]) -> list[Any]:
    """The prompt vLLM runs, one item per position: text ids, and (picture, slot) for each picture token."""
    from model.conversation import build_prompt

    image_id, tokens = int(backend.facts["image_token_id"]), int(backend.facts["num_image_tokens"])
    plan = cut_left(backend.codec.segment_token_ids(build_prompt(backend.spec.template, turns)), images,
                    image_id, tokens, 10**9)  # fmt: skip
    pictures, out = iter(plan.images), []
    for token in plan.token_ids:
        if token == image_id:
            data = next(pictures)
            out += [(data, k) for k in range(tokens)]
        else:
            out.append(token)
    return out


def test_one_picture_greedy_ids_equal_the_local_engine(each: dict[str, Any]) -> None:
    local, vllm = one_picture(each, "one")
    same_answer(local, vllm)
    assert len(final(vllm).token_ids) > 1


def test_one_picture_with_a_strong_penalty_equals_the_local_engine(env: dict[str, Any]) -> None:
    """Penalty 1.6: vLLM's own penalty (prompt tokens too) would change these ids; the reference's
    generated-only penalty (the worker's logits processor) keeps them equal."""
    same_answer(*one_picture(env, "penalty", repetition_penalty=1.6))


def test_two_turn_thread_with_a_second_picture_equals_the_local_engine_and_hits_the_prefix_cache(
    each: dict[str, Any],
) -> None:
    """The follow-up adds a second picture; vLLM reuses the first turn's KV blocks — text ids and the first
    picture's tokens (the same picture hash) — exactly as far as the two prompts agree, in whole blocks."""
    loop, backend = each["loop"], each["vllm"]
    first: list[ChatTurn] = [{"role": "user", "text": FIRST, "image": True}]
    one = final(loop.run(drain(each["local"], first, [picture(0)], "two")))
    turns: list[ChatTurn] = [*first, {"role": "assistant", "text": one.text},
                             {"role": "user", "text": SECOND, "image": True}]  # fmt: skip
    vllm_one = final(loop.run(drain(backend, first, [picture(0)], "two")))
    assert vllm_one.token_ids == one.token_ids
    local = loop.run(drain(each["local"], turns, [picture(0), picture(1)], "two"))
    vllm = loop.run(drain(backend, turns, [picture(0), picture(1)], "two"))
    same_answer(local, vllm)

    block = int(backend.facts["block_size"])
    assert block == each["vllm_table"].get("block_size", block)
    cached_before = [*expanded(backend, first, [picture(0)]), *one.token_ids][:-1]  # the last id was never fed
    follow = expanded(backend, turns, [picture(0), picture(1)])
    common = next((i for i, (a, b) in enumerate(zip(cached_before, follow, strict=False)) if a != b),
                  min(len(cached_before), len(follow)))  # fmt: skip
    picture_end = max(i for i, item in enumerate(follow) if isinstance(item, tuple) and item[0] == picture(0)) + 1
    reused = final(vllm).reused_prefix_tokens
    assert reused == common // block * block >= picture_end  # the cached blocks hold the whole first picture


def test_eight_concurrent_threads_with_pictures_equal_the_local_engine(each: dict[str, Any]) -> None:
    threads = [[{"role": "user", "text": f"Thread {i}: what is in this picture, and what colour is it?",
                 "image": True}] for i in range(8)]  # fmt: skip

    async def all_of(backend: Any) -> list[list[Any]]:
        return list(await asyncio.gather(*(drain(backend, t, [picture(10 + i)], f"c{i}")
                                           for i, t in enumerate(threads))))  # fmt: skip

    local, vllm = each["loop"].run(all_of(each["local"])), each["loop"].run(all_of(each["vllm"]))
    for a, b in zip(local, vllm, strict=True):
        same_answer(a, b)


def test_a_thread_with_more_pictures_than_limit_mm_per_prompt_gets_a_clear_message(env: dict[str, Any]) -> None:
    """[vllm] limit_mm_per_prompt reaches the worker (vLLM enforces it too); the backend refuses such a thread
    before sending it, and the core tells the user to start over — the worker keeps serving."""
    from bot.core.errors import UserInputError
    from bot.core.pipeline.stream import engine_error

    backend: VllmBackend = env["vllm"]
    assert backend.facts["limit_mm_per_prompt"] == LIMIT
    turns: list[ChatTurn] = []
    for k in range(LIMIT + 1):
        turns += [{"role": "user", "text": f"Picture {k}?", "image": True}, {"role": "assistant", "text": "A circle."}]
    with pytest.raises(RequestTooLarge, match=r"3 pictures.*at most 2 per prompt \(\[vllm\] limit_mm_per_prompt\)"):
        env["loop"].run(drain(backend, turns[:-1], [picture(k) for k in range(LIMIT + 1)], "many"))
    told = engine_error(RequestTooLarge("x"), 1)
    assert isinstance(told, UserInputError) and "Say reset to start over" in str(told)
    same_answer(*one_picture(env, "after-many"))


def test_vllm_itself_refuses_more_pictures_than_the_limit_with_too_large(env: dict[str, Any]) -> None:
    """A bot process whose own limit is higher than the shared worker's (``[vllm] url``): vLLM's refusal comes
    back as a clear RequestTooLarge too, not a crash."""
    loop, backend = env["loop"], env["vllm"]
    other = loop.run(VLLM.start(attached(env, limit_mm_per_prompt=8)))
    try:
        other.facts = {**other.facts, "limit_mm_per_prompt": 8}  # as a worker of an older bot would report
        turns: list[ChatTurn] = []
        for k in range(LIMIT + 1):
            turns += [{"role": "user", "text": f"Picture {k}?", "image": True},
                      {"role": "assistant", "text": "A circle."}]  # fmt: skip
        with pytest.raises(RequestTooLarge, match="may be provided in one prompt"):
            loop.run(drain(other, turns[:-1], [picture(k) for k in range(LIMIT + 1)], "many-worker"))
    finally:
        loop.run(other.close())
    assert loop.run(backend.problem()) is None


def test_a_thread_longer_than_vllms_max_model_len_is_too_large_not_a_failure(env: dict[str, Any]) -> None:
    """vLLM 0.32 refuses it with ``VLLMValidationError`` (not a ``ValueError``): the user must get "too long,
    say reset", not "the model is unavailable"."""
    long = " ".join(f"word{i} and more words" for i in range(900))  # well past the worker's 2048 positions
    with pytest.raises(RequestTooLarge, match="maximum context length is 2048 tokens"):
        env["loop"].run(drain(env["vllm"], [{"role": "user", "text": long}], [], "long", max_length=20000))
    assert env["loop"].run(env["vllm"].problem()) is None


def attached(env: dict[str, Any], **table: Any) -> Settings:
    """Settings of a second bot process that uses the running worker (``[vllm] url``)."""
    vllm = env["vllm_table"] | {"url": env["vllm"].url} | table
    settings = env["settings"].model_copy(update={"vllm": vllm})
    return Settings.model_validate(settings.model_dump())


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


LONG = GREEDY | {"max_new_tokens": 1500, "max_length": 2000}
PICTURE_TURN: list[ChatTurn] = [{"role": "user", "text": FIRST, "image": True}]


def test_vllm_closing_the_reply_aborts_the_request_and_frees_its_slot(env: dict[str, Any]) -> None:
    backend: VllmBackend = env["vllm"]
    loop = env["loop"]

    async def leave_early() -> dict[str, Any]:
        stream = backend.stream(turns=PICTURE_TURN, images=[picture(3)], conversation_id="leave", user="leave",
                                options=LONG)  # fmt: skip
        for _ in range(3):
            await anext(stream)
        during = await backend.worker_stats()
        await stream.aclose()
        return during

    during = loop.run(leave_early())
    assert during["unfinished"] == 1 and during["running"] == 1
    wait_for(lambda: loop.run(backend.worker_stats())["unfinished"] == 0, 30, "the aborted request stayed")
    wait_for(lambda: loop.run(backend.worker_stats())["running"] == 0, 30, "vLLM kept running it")


class TestVllmBackendContract(BackendContract):
    """The backend contract suite (``tests/contracts/backend_contract.py``) on this module's vicuna0 worker."""

    @pytest.fixture
    def driver(self, env: dict[str, Any]) -> BackendDriver:
        backend: VllmBackend = env["vllm"]

        async def idle() -> bool:
            stats = await backend.worker_stats()
            return stats["unfinished"] == 0 and stats["running"] == 0

        return BackendDriver(backend, env["loop"].run, idle)


def test_vllm_no_first_token_within_max_wait_is_busy(env: dict[str, Any]) -> None:
    """A second bot process attaching by url; its max_wait_s is shorter than any answer's first token."""
    loop, backend = env["loop"], env["vllm"]
    other = loop.run(VLLM.start(attached(env, max_wait_s=0.001)))
    try:
        with pytest.raises(Busy):
            loop.run(drain(other, PICTURE_TURN, [picture(4)], "busy"))
    finally:
        loop.run(other.close())
    wait_for(lambda: loop.run(backend.worker_stats())["unfinished"] == 0, 30, "the Busy request was not aborted")


def test_vllm_worker_killed_mid_answer_fails_the_turn_then_recovers(env: dict[str, Any]) -> None:
    loop, backend = env["loop"], env["vllm"]
    assert loop.run(backend.problem()) is None
    pid = backend.worker.process.pid

    async def killed() -> None:
        stream = backend.stream(turns=PICTURE_TURN, images=[picture(5)], conversation_id="kill", user="kill",
                                options=LONG)  # fmt: skip
        await anext(stream)
        os.killpg(pid, 9)
        async for _ in stream:
            pass

    with pytest.raises(RequestFailed):
        loop.run(killed())
    assert loop.run(backend.problem()) is not None  # /readyz: 503
    with pytest.raises(RequestFailed):  # still down: a clear "try again", not a hang
        loop.run(drain(backend, PICTURE_TURN, [picture(5)], "down"))
    wait_for(lambda: backend.worker.process.pid != pid and loop.run(backend.problem()) is None, 240,
             "the worker was not started again")  # fmt: skip
    same_answer(*one_picture(env, "back"))


def test_the_benchmarks_vllm_system_runs_through_this_backend(env: dict[str, Any], tmp_path: Path) -> None:
    """``benchmarks/engine.py``'s vllm system at tiny size (so it does not rot): its random-weights export is a
    folder the plugin's coverage check accepts, and its workload driver answers one three-turn conversation and
    one follow-up through a running backend (this module's worker, to spare a start)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _vllm

    from model.vllm_plugin.export import check_export

    config = check_export(_vllm.export_random("small", tmp_path / "small", "float32"))
    assert config.num_image_tokens == 32 and config.text_config.num_attention_heads == 4
    loop, backend = env["loop"], env["vllm"]
    result = loop.run(_vllm.run(backend, 1, 4))
    assert result["tokens"] == 3 * 4 and len(result["first"]) == 1 and len(result["follow"]) == 2
    follow = loop.run(_vllm.follow_up(backend, 400, 4, trials=2))
    assert follow["reused"] >= int(backend.facts["block_size"]) and follow["context"] > follow["reused"]
    assert _vllm.peak_mb(backend, "cpu") > 100  # this process plus the worker's processes


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (and the CUDA vLLM wheel in .venv-vllm)")
def test_on_cuda_in_float16_a_picture_and_a_follow_up_match_the_local_engine(tmp_path: Path) -> None:
    """The same on a GPU in fp16: the local engine and vLLM (its CUDA kernels) expand the picture alike and agree on
    the answer's first tokens (fp16 kernels may part later: the first differing token is named), and the
    follow-up reuses the cached blocks."""
    for pair in start_pair("vicuna0", tmp_path, device="cuda", dtype="float16"):
        loop, backend = pair["loop"], pair["vllm"]
        local, vllm = one_picture(pair, "gpu")
        a, b = final(local), final(vllm)
        assert b.prompt_tokens == a.prompt_tokens
        agree = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y), None)
        assert agree is None or agree >= 4, f"fp16 ids diverge at generated token {agree}"
        first: list[ChatTurn] = [{"role": "user", "text": FIRST, "image": True}]
        turns: list[ChatTurn] = [*first, {"role": "assistant", "text": b.text}, {"role": "user", "text": SECOND}]
        follow = final(loop.run(drain(backend, turns, [picture(0)], "gpu")))
        assert follow.reused_prefix_tokens >= int(backend.facts["block_size"])
