"""The ``vllm`` system of ``benchmarks/engine.py``: the bot's vLLM backend on the benchmark's random weights.

:func:`export_random` writes :func:`_models.random_minigpt4` (the same seed, shape and init the other systems
load) as a vLLM model folder, with the export's own name map and checks; :func:`start` then starts the
backend exactly as ``serve`` does (``[engine] backend = "vllm"``: a worker in ``.venv-vllm``), and
:func:`run` / :func:`follow_up` replay the workload through ``VllmBackend.stream`` — prompt building, HTTP
streaming and detokenising included, so the numbers are what a bot process gets.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from _workload import TURNS
from _workload import image as _image
from _workload import turns as _turns


def export_random(shape: str, out: Path, dtype: str) -> Path:
    """``random_minigpt4(shape)`` (built on the CPU) → a folder vLLM loads, stored in ``dtype``."""
    import torch
    from _models import random_minigpt4

    from model.vllm_plugin.export import _check, _config, _save_shards, vllm_state

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = random_minigpt4(shape, "cpu", getattr(torch, dtype))
    config = _config(model)
    config.dtype = dtype
    state = {k: v.detach().to(getattr(torch, dtype)) for k, v in vllm_state(model).items()}
    _check(state, config, f"the random {shape} model")
    _save_shards(state, tmp)
    config.save_pretrained(tmp)
    _tokenizer(tmp, int(config.image_token_id))
    del model, state
    tmp.rename(out)
    return out


def _tokenizer(out: Path, image_token_id: int) -> None:
    """The tokenizer ``random_minigpt4`` trains (512 pieces), padded with unused tokens up to the LLM's 32,000
    rows, then ``<ImageHere>`` = ``image_token_id``: vLLM refuses prompt ids past the tokenizer's largest.
    The bot's codec decodes the SentencePiece pieces and drops the rest; vLLM never detokenises here."""
    from transformers import AutoTokenizer

    from model.conversation import IMAGE_PLACEHOLDER
    from model.demo_weights import _train_tokenizer

    _train_tokenizer(out, 512)
    tokenizer = AutoTokenizer.from_pretrained(out, legacy=True)
    tokenizer.add_tokens([f"<unused{i}>" for i in range(len(tokenizer), image_token_id)], special_tokens=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    assert tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) == image_token_id
    tokenizer.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(config | {"legacy": True}, indent=2))


def settings(model_dir: Path, data_dir: Path, device: str, threads: int, prefix_caching: bool = True) -> Any:
    """``[engine] backend = "vllm"`` with a started worker on ``model_dir``, sized for ``threads`` conversations."""
    from bot.core.config import Settings

    cpu = not device.startswith("cuda")
    vllm = {
        "model_dir": str(model_dir),
        "dtype": "float32" if cpu else "float16",
        "threads": (os.cpu_count() or 1) if cpu else 0,
        "kv_cache_gib": 1.0 if cpu else float(os.environ.get("BENCH_VLLM_KV_GIB", "30")),
        "max_num_seqs": max(16, threads),
        "max_model_len": 4096,
        "enforce_eager": cpu,  # CPU: torch.compile of the model costs minutes on 2 cores; GPU: CUDA graphs
        "max_wait_s": 3600,
        "limit_mm_per_prompt": 1,
        "prefix_caching": prefix_caching,
        "block_size": int(os.environ.get("BENCH_VLLM_BLOCK", "0")),  # 0 = vLLM's (CPU 128, CUDA 16)
        "start_timeout_s": 1800,
    }
    return Settings.model_validate({"data_dir": str(data_dir), "engine": {"backend": "vllm"}, "vllm": vllm})


async def start(model_dir: Path, data_dir: Path, device: str, threads: int, prefix_caching: bool = True) -> Any:
    from bot.cli.vllm_backend import VLLM

    backend = await VLLM.start(settings(model_dir, data_dir, device, threads, prefix_caching))
    await _answer(backend, _turns([], 0), -1, 2)  # warm-up (a picture no thread uses)
    return backend


def _options(max_new: int) -> dict[str, Any]:
    # the same fixed answer length as the other systems: EOS is masked until max_new tokens
    return {"do_sample": False, "max_new_tokens": max_new, "min_length": max_new + 1, "repetition_penalty": 1.0,
            "stop_strings": []}  # fmt: skip


async def _answer(
    backend: Any, turns: list[dict[str, Any]], picture: int, max_new: int, conversation: str = "w"
) -> Any:
    stream = backend.stream(turns=turns, images=[_image(picture)], conversation_id=conversation, user=conversation,
                            options=_options(max_new))  # fmt: skip
    events = [event async for event in stream]
    return events[-1]


async def run(backend: Any, threads: int, max_new: int) -> dict[str, Any]:
    """``threads`` conversations at once, 3 turns each, through the backend (as ``run_engine``)."""
    import asyncio

    ttft_first: list[float] = []
    ttft_follow: list[float] = []
    tokens = 0

    async def thread(i: int) -> None:
        nonlocal tokens
        done: list[str] = []
        for k in range(len(TURNS)):
            final = await _answer(backend, _turns(done, k), i, max_new, f"t{i}")
            (ttft_first if k == 0 else ttft_follow).append(final.ttft_s)
            tokens += final.completion_tokens
            done.append(final.text or "ok")

    started = time.perf_counter()
    await asyncio.gather(*(thread(i) for i in range(threads)))
    return {"elapsed": time.perf_counter() - started, "tokens": tokens, "first": ttft_first, "follow": ttft_follow}


async def follow_up(backend: Any, history_tokens: int, max_new: int, trials: int = 4) -> dict[str, Any]:
    """A follow-up's TTFT at a ~``history_tokens`` history (as ``run_follow_up``), median of trials 2..n."""
    long_answer = " ".join(["the red circle sits beside a green square on a white table"] * 8)
    rounds = max(1, history_tokens // max(1, len(backend.codec.segment_token_ids(long_answer)[0]) + 12))
    base: list[dict[str, Any]] = []
    for k in range(rounds):
        base += [{"role": "user", "text": f"Tell me more, part {k}.", "image": k == 0},
                 {"role": "assistant", "text": long_answer}]  # fmt: skip
    samples, final = [], None
    for trial in range(trials):
        history = [*base, {"role": "user", "text": f"And the colours? ({trial})"}]
        warm = await _answer(backend, history, 1, max_new, f"c{trial}")
        follow = [*history, {"role": "assistant", "text": warm.text or "ok"},
                  {"role": "user", "text": "Which one is bigger?"}]  # fmt: skip
        final = await _answer(backend, follow, 1, max_new, f"c{trial}")
        samples.append(final.ttft_s)
    assert final is not None
    return {"ttft": statistics.median(samples[1:] or samples), "context": final.prompt_tokens,
            "reused": final.reused_prefix_tokens}  # fmt: skip


def peak_mb(backend: Any, device: str) -> float:
    """This process's peak RSS plus each vLLM worker process's (worker, engine core: one process group);
    on a GPU the device memory vLLM holds (it reserves its KV cache up front) instead of the workers' RSS."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=False)  # fmt: skip
        return own + sum(float(x) for x in out.stdout.split() if x.strip().isdigit())
    return own + sum(_hwm_kb(pid) for pid in _group(backend.worker.process.pid)) / 1024


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:  # field 5 of /proc/PID/stat: the process group
                pids.append(int(entry.name))
    return pids


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def describe(backend: Any) -> str:
    return json.dumps({k: backend.facts.get(k) for k in ("dtype", "block_size", "max_num_seqs")})
