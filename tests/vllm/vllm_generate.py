"""Run greedy requests through ``vllm.LLM`` on an exported MiniGPT-4 folder (run with the vLLM venv's python).

``python vllm_generate.py REQUESTS.json OUT.json``; REQUESTS = {"model": DIR, "requests": [{"prompt_token_ids",
"images": [file], "max_tokens"}], "logprobs": N}.  OUT = {"results": [{"token_ids", "logprobs",
"num_cached_tokens"}], "load_s"}.  Requests run one after another (a follow-up then finds its prefix cached).
Pictures are read as the bot reads them (``model.image_processing.load_image``), identified by sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from model.image_processing import load_image
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, block_size=32, max_model_len=2048,
              max_num_seqs=4, limit_mm_per_prompt={"image": 4}, seed=0)  # fmt: skip
    load_s = time.perf_counter() - started
    results = []
    for request in spec["requests"]:
        raw = [Path(p).read_bytes() for p in request.get("images", [])]
        prompt: dict = {"prompt_token_ids": request["prompt_token_ids"]}
        if raw:
            prompt["multi_modal_data"] = {"image": [load_image(b) for b in raw]}
            prompt["multi_modal_uuids"] = {"image": [hashlib.sha256(b).hexdigest() for b in raw]}
        params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"],
                                logprobs=spec.get("logprobs") or None, repetition_penalty=1.0)  # fmt: skip
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        completion = out.outputs[0]
        logprobs = [{str(k): v.logprob for k, v in step.items()} for step in completion.logprobs or []]
        results.append({"token_ids": list(completion.token_ids), "logprobs": logprobs,
                        "num_cached_tokens": out.num_cached_tokens or 0})  # fmt: skip
    Path(sys.argv[2]).write_text(json.dumps({"results": results, "load_s": load_s}))


if __name__ == "__main__":
    main()
