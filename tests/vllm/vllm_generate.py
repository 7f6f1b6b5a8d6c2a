"""Greedy requests through ``vllm.LLM`` on exported MiniGPT-4 folders (run with the vLLM venv's python).

``python vllm_generate.py SPEC.json OUT.json``; SPEC = {"runs": [{"model": DIR, "multiprocess": bool,
"requests": [{"prompt_token_ids", "images": [file], "max_tokens"}]}], "logprobs": N}.  OUT = {"runs":
[{"results": [{"token_ids", "logprobs", "num_cached_tokens"}], "load_s"}]}.

One ``LLM`` per run, one after another in this process.  ``multiprocess`` runs vLLM as it serves (engine
core and worker spawned: the plugin is loaded by entry point in each); otherwise engine and worker run
in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor) — the same model runner and
kernels, ~30 s less start-up on 2 cores.  Requests of a run go one after another, so a follow-up finds
its prefix cached.  Pictures are read as the bot reads them (``load_image``), identified by sha256.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def run(llm_cls: Any, params_cls: Any, spec: dict[str, Any], logprobs: int) -> dict[str, Any]:
    from model.image_processing import load_image

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if spec.get("multiprocess") else "0"
    started = time.perf_counter()
    try:
        llm = llm_cls(model=spec["model"], dtype=spec.get("dtype", "float32"), enforce_eager=True, block_size=32,
                      max_model_len=2048, max_num_seqs=4, limit_mm_per_prompt={"image": 4}, seed=0,
                      distributed_executor_backend="mp" if spec.get("multiprocess") else "uni")  # fmt: skip
    except Exception as exc:  # a folder that must be refused: report why
        if not spec.get("expect_error"):
            raise
        return {"error": f"{type(exc).__name__}: {exc}", "results": []}
    load_s = time.perf_counter() - started
    dtypes = llm.apply_model(_dtypes)[0] if spec.get("probe") else {}
    _EMBED[:] = spec.get("embed_images", [])
    embeddings = llm.apply_model(_embed)[0] if _EMBED and not spec.get("multiprocess") else []
    results = []
    for request in spec["requests"]:
        raw = [Path(p).read_bytes() for p in request.get("images", [])]
        params = params_cls(temperature=0.0, max_tokens=request["max_tokens"], logprobs=logprobs or None)
        if "messages" in request:  # the OpenAI chat path of `vllm serve`: the folder's chat template renders
            pictures = iter(raw)
            messages = [{**m, "content": [_part(c, pictures, load_image) for c in m["content"]]}
                        if isinstance(m["content"], list) else m for m in request["messages"]]  # fmt: skip
            out = llm.chat(messages, params, use_tqdm=False)[0]
        else:
            prompt: dict[str, Any] = {"prompt_token_ids": request["prompt_token_ids"]}
            if raw:
                prompt["multi_modal_data"] = {"image": [load_image(b) for b in raw]}
                prompt["multi_modal_uuids"] = {"image": [hashlib.sha256(b).hexdigest() for b in raw]}
            out = llm.generate([prompt], params, use_tqdm=False)[0]
        completion = out.outputs[0]
        steps = [{str(k): v.logprob for k, v in step.items()} for step in completion.logprobs or []]
        results.append({"token_ids": list(completion.token_ids), "logprobs": steps,
                        "prompt_token_ids": list(out.prompt_token_ids or []),
                        "num_cached_tokens": out.num_cached_tokens or 0})  # fmt: skip
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return {"results": results, "load_s": load_s, "dtypes": dtypes, "embeddings": embeddings}


def _dtypes(model: Any) -> dict[str, str]:
    """Each top-level part's parameter dtypes (``ln_vision``, Q-Former, projection: float32 in any model dtype)."""
    out: dict[str, set[str]] = {}
    for name, param in model.named_parameters():
        out.setdefault(name.split(".")[0], set()).add(str(param.dtype).removeprefix("torch."))
    return {part: ",".join(sorted(kinds)) for part, kinds in out.items()}


_EMBED: list[str] = []  # pictures for _embed (a plain function: vLLM serialises what apply_model runs)


def _embed(model: Any) -> list[Any]:
    """The model's picture embeddings (``embed_multimodal``) for ``_EMBED``, preprocessed as the bot does.

    Runs in this process, so only for in-process runs (not ``multiprocess``).
    """
    import torch

    from model.image_processing import ImageProcessor, load_image

    processor = ImageProcessor(model.config.image_size)
    pixels = torch.stack([processor(load_image(Path(p).read_bytes())) for p in _EMBED])
    with torch.inference_mode():
        return [t.float().cpu().tolist() for t in model.embed_multimodal(pixel_values=pixels)]


def _part(part: dict[str, Any], pictures: Any, load_image: Any) -> dict[str, Any]:
    if part.get("type") != "image":
        return part
    return {"type": "image_pil", "image_pil": load_image(next(pictures))}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams

    runs = [run(LLM, SamplingParams, one, int(spec.get("logprobs") or 0)) for one in spec["runs"]]
    Path(sys.argv[2]).write_text(json.dumps({"runs": runs}))


if __name__ == "__main__":
    main()
