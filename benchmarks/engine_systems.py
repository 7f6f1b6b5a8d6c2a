"""The systems that benchmarks/engine.py compares, each replaying the same threads on one model.

* :func:`run_baseline` — the reference demo's loop: one request at a time, full re-prefill per turn.
* :func:`run_engine` — the local engine: continuous batching, picture and KV-prefix reuse.
* :func:`run_static` — plain transformers static batching of the same requests (the peer to beat).
* :func:`run_follow_up` — a follow-up's TTFT at a long history, prefix reuse against a full re-prefill.
* :func:`with_lag` — any of them with the event-loop lag probe beside it.

Each returns ``{"elapsed", "tokens", "first", "follow"}`` (TTFTs in seconds); the vllm system lives in
``_vllm.py``.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from _workload import TURNS
from _workload import image as _image
from _workload import turns as _turns

TORCH_THREADS = 0  # --torch-threads, set by the worker: [engine] threads for every system
MAX_PREFILLS = 4  # --max-prefills, set by the worker: the engine's [engine] max_prefills_per_step


def _first_token_streamer():
    """A transformers streamer that notes when the first generated token(s) arrive."""
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.first: float | None = None
            self.calls = 0

        def put(self, value) -> None:
            self.calls += 1  # call 1 is the (empty) prompt, call 2 the first generated token(s)
            if self.first is None and self.calls >= 2:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    return FirstToken()


def _options(model, max_new: int):
    from model.generate import default_options

    # A fixed answer length for both systems: EOS is masked until max_new tokens (min_length counts BOS).
    return default_options(
        model, do_sample=False, max_new_tokens=max_new, min_length=max_new + 1, repetition_penalty=1.0, stop_strings=()
    )


async def run_baseline(model, threads: int, max_new: int) -> dict:
    """One request at a time, full re-prefill per turn, HF generate (the reference demo's loop)."""
    import torch

    from model.generate import decode_answer
    from model.image_processing import load_image

    server = asyncio.Lock()
    ttft_first: list[float] = []
    ttft_follow: list[float] = []
    tokens = 0

    def answer(turns, image_tokens):
        prompt = model.build_prompt(turns)
        ctx = model.context_embeddings(prompt, [image_tokens])
        streamer = _first_token_streamer()
        with torch.inference_mode():
            out = model.llm.generate(
                inputs_embeds=ctx.unsqueeze(0),
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                streamer=streamer,
                pad_token_id=2,
            )
        return out[0].tolist(), streamer.first

    async def thread(i: int) -> None:
        nonlocal tokens
        done: list[str] = []
        image_tokens = None
        for k in range(len(TURNS)):
            submitted = time.perf_counter()
            async with server:
                if image_tokens is None:  # Chat.encode_img: once per upload
                    image_tokens = model.encode_pil([load_image(_image(i))])[0]
                ids, first = await asyncio.to_thread(answer, _turns(done, k), image_tokens)
            (ttft_first if k == 0 else ttft_follow).append(first - submitted)
            tokens += len(ids)
            done.append(decode_answer(model, ids) or "ok")

    start = time.perf_counter()
    await asyncio.gather(*(thread(i) for i in range(threads)))
    return {"elapsed": time.perf_counter() - start, "tokens": tokens, "first": ttft_first, "follow": ttft_follow}


async def run_engine(model, threads: int, max_new: int) -> dict:
    from model.engine import Engine, EngineConfig, EngineRequest, SchedulerConfig

    opts = _options(model, max_new)
    config = EngineConfig(scheduler=SchedulerConfig(max_batch=64, max_queue=1024, max_running_per_user=4,
                                                    max_wait_s=3600, kv_budget_tokens=1_000_000,
                                                    max_prefills_per_step=MAX_PREFILLS),
                          threads=TORCH_THREADS)  # fmt: skip
    ttft_first: list[float] = []
    ttft_follow: list[float] = []
    tokens = 0
    async with Engine(model, config) as engine:

        async def thread(i: int) -> None:
            nonlocal tokens
            done: list[str] = []
            image = _image(i)
            for k in range(len(TURNS)):
                request = EngineRequest(
                    turns=_turns(done, k), images=[image], options=opts, conversation_id=f"t{i}", user=f"u{i}"
                )
                final = await engine.generate(request)
                (ttft_first if k == 0 else ttft_follow).append(final.ttft_s)
                tokens += final.completion_tokens
                done.append(final.text or "ok")

        start = time.perf_counter()
        await asyncio.gather(*(thread(i) for i in range(threads)))
        elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "tokens": tokens, "first": ttft_first, "follow": ttft_follow}


async def run_static(model, threads: int, max_new: int) -> dict:
    """The peer to beat: plain transformers static batching — each turn of every thread in one ``generate`` call.

    All ``threads`` conversations ask turn k together; the batch is left-padded and masked and runs until
    every row has its ``max_new`` tokens; turn k+1 starts once the whole batch is done (full re-prefill,
    no prefix reuse, the picture encoded once per thread, greedy).
    """
    import torch

    from model.generate import decode_answer
    from model.image_processing import load_image

    def batch(contexts: list) -> tuple[list[list[int]], float | None]:
        longest = max(c.shape[0] for c in contexts)
        embeds = contexts[0].new_zeros(len(contexts), longest, contexts[0].shape[-1])
        mask = torch.zeros(len(contexts), longest, dtype=torch.long)
        for i, ctx in enumerate(contexts):
            embeds[i, longest - ctx.shape[0] :] = ctx
            mask[i, longest - ctx.shape[0] :] = 1
        streamer = _first_token_streamer()
        with torch.inference_mode():
            out = model.llm.generate(inputs_embeds=embeds, attention_mask=mask.to(embeds.device),
                                     max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                     streamer=streamer, pad_token_id=2)  # fmt: skip
        return out.tolist(), streamer.first

    ttft_first: list[float] = []
    ttft_follow: list[float] = []
    tokens = 0
    start = time.perf_counter()
    image_tokens = [model.encode_pil([load_image(_image(i))])[0] for i in range(threads)]
    done: list[list[str]] = [[] for _ in range(threads)]
    for k in range(len(TURNS)):
        submitted = time.perf_counter()
        contexts = [model.context_embeddings(model.build_prompt(_turns(done[i], k)), [image_tokens[i]])
                    for i in range(threads)]  # fmt: skip
        rows, first = await asyncio.to_thread(batch, contexts)
        assert first is not None  # min_new_tokens=max_new: the streamer saw a first token
        (ttft_first if k == 0 else ttft_follow).extend([first - submitted] * threads)
        for i, ids in enumerate(rows):
            tokens += len(ids)
            done[i].append(decode_answer(model, ids) or "ok")
    return {"elapsed": time.perf_counter() - start, "tokens": tokens, "first": ttft_first, "follow": ttft_follow}


async def _loop_lag(samples: list[float], period: float = 0.010) -> None:
    """What a ``/healthz`` handler would wait: sleep 10 ms, record the overshoot, until cancelled."""
    while True:
        before = time.perf_counter()
        await asyncio.sleep(period)
        samples.append(time.perf_counter() - before - period)


async def with_lag(run, *args) -> dict:
    """Run one system with the loop-lag probe beside it; adds ``lag`` (overshoots, seconds) to its result."""
    samples: list[float] = []
    probe = asyncio.create_task(_loop_lag(samples))
    try:
        result = await run(*args)
    finally:
        probe.cancel()
    result["lag"] = samples
    return result


async def run_follow_up(model, history_tokens: int, max_new: int) -> dict:
    """TTFT of a follow-up at a long history: prefix reuse vs full re-prefill (both in the engine)."""
    from model.engine import Engine, EngineConfig, EngineRequest

    opts = _options(model, max_new)
    long_answer = " ".join(["the red circle sits beside a green square on a white table"] * 8)
    rounds = max(1, history_tokens // max(1, len(model.segment_token_ids(long_answer)[0]) + 12))
    done = [long_answer] * rounds
    base = []
    for k in range(rounds):
        base += [{"role": "user", "text": f"Tell me more, part {k}.", "image": k == 0},
                 {"role": "assistant", "text": done[k]}]  # fmt: skip
    results = {}
    for reuse in (False, True):
        async with Engine(model, EngineConfig(prefix_reuse=reuse, threads=TORCH_THREADS)) as engine:
            image = _image(1)
            samples = []
            for trial in range(4):
                history = [*base, {"role": "user", "text": f"And the colours? ({trial})"}]
                warm = await engine.generate(EngineRequest(turns=history, images=[image], options=opts,
                                                           conversation_id=f"c{trial}"))  # fmt: skip
                follow = [*history, {"role": "assistant", "text": warm.text or "ok"},
                          {"role": "user", "text": "Which one is bigger?"}]  # fmt: skip
                final = await engine.generate(EngineRequest(turns=follow, images=[image], options=opts,
                                                            conversation_id=f"c{trial}"))  # fmt: skip
                samples.append(final.ttft_s)
                results["context"] = final.prompt_tokens
                results[f"reused_{reuse}"] = final.reused_prefix_tokens
            results["reuse" if reuse else "full"] = statistics.median(samples[1:])
    return results
