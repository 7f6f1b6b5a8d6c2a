"""Loading real-size weights: load time, peak memory against the loaded bytes, and one answer's speed.

Writes random weights with the real shapes in the **original file layouts** (LAVIS ``eva_vit_g.pth``
with its 40th block, BLIP-2 ``{"model": …}`` with ``t5_proj``, a stage-2 wrapper, an HF LLaMA folder
of fp16 safetensors shards with its index) to a temporary folder, then loads them in a fresh process
through the same loader as real weights (``model.load_minigpt4``) and answers one question.

    python benchmarks/load.py --shape 7b                 # Vicuna-7B stack: ~16 GB of files, dtype auto
    python benchmarks/load.py --shape 7b --device cuda   # adds peak GPU memory
    python benchmarks/load.py --shape medium --json      # a few hundred MB (tests/weights use it)

Peak RSS is measured in the loading process from a baseline taken after its imports (the kernel's
peak counter is reset there: ``/proc/self/clear_refs``), so it is what loading adds; the goal is at
most 1.25× the bytes of the loaded weights (no second full copy at any point).  The files are deleted
afterwards unless ``--keep DIR`` names a folder to write them into.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

BOUND = 1.25  # peak RSS over the loaded weights' bytes

SHAPES: dict[str, dict[str, Any]] = {
    "medium": dict(
        vision=dict(img_size=224, patch_size=14, width=384, depth=6, heads=6, mlp_hidden=1536),
        qformer=dict(hidden=256, layers=2, heads=4, intermediate=1024, num_query_token=32, encoder_width=384),
        llm=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16),
        shard_bytes=100 * 2**20,
        new_tokens=16,
    ),
    "7b": dict(
        vision={},  # no overrides: the published ViT-g and Q-Former (model.variants' defaults)
        qformer={},
        llm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        shard_bytes=5 * 2**30,
        new_tokens=8,
    ),
}


# --------------------------------------------------------------------------- writing


def write_weights(out: Path, shape: str, seed: int = 0) -> dict[str, Any]:
    """Write the four parts of a Vicuna v0 MiniGPT-4 of ``shape`` under ``out``; returns the [model] keys."""
    import torch

    from model.demo_weights import DemoSizes, _write_blip2, _write_projection
    from model.variants import QFormerDims, VisionDims

    sizes = SHAPES[shape]
    vision, qformer = VisionDims(**sizes["vision"]), QFormerDims(**sizes["qformer"])
    demo = DemoSizes(vision=vision, qformer=qformer, llm_hidden=sizes["llm"]["hidden_size"])
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    _write_llm(out / "llm", sizes, gen)
    _write_vit(out / "eva_vit_g.pth", vision, gen)
    _write_blip2(out / "blip2_pretrained_flant5xxl.pth", qformer, vision, gen)
    _write_projection(out / "prerained_minigpt4_7b.pth", qformer.hidden, demo, gen, lora=False)
    return dict(
        variant="vicuna0", llm=str(out / "llm"), vit=str(out / "eva_vit_g.pth"),
        qformer=str(out / "blip2_pretrained_flant5xxl.pth"), projection=str(out / "prerained_minigpt4_7b.pth"),
        vision=dict(sizes["vision"]), qformer_dims=dict(sizes["qformer"]),
    )  # fmt: skip


def _fill(shape: tuple[int, ...], name: str, gen: Any) -> Any:
    """A random fp16 tensor (norm weights around 1), made in fp16 so a 7B file is never held in fp32."""
    import torch

    tensor = torch.empty(shape, dtype=torch.float16)
    if "norm" in name and name.endswith("weight"):
        return tensor.fill_(1.0)
    return tensor.normal_(0.0, 0.02, generator=gen)


def _write_vit(path: Path, v: Any, gen: Any) -> None:
    """LAVIS ``eva_vit_g.pth``: a plain fp16 state dict, ``q_bias``/``v_bias``, one block more than used."""
    import torch

    w, h = v.width, v.mlp_hidden
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, w), "pos_embed": (1, 1 + v.num_patches, w),
        "patch_embed.proj.weight": (w, 3, v.patch_size, v.patch_size), "patch_embed.proj.bias": (w,),
    }  # fmt: skip
    for i in range(v.depth + 1):
        p = f"blocks.{i}."
        shapes |= {
            p + "norm1.weight": (w,), p + "norm1.bias": (w,), p + "attn.q_bias": (w,), p + "attn.v_bias": (w,),
            p + "attn.qkv.weight": (3 * w, w), p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
            p + "norm2.weight": (w,), p + "norm2.bias": (w,), p + "mlp.fc1.weight": (h, w), p + "mlp.fc1.bias": (h,),
            p + "mlp.fc2.weight": (w, h), p + "mlp.fc2.bias": (w,),
        }  # fmt: skip
    torch.save({name: _fill(shape, name, gen) for name, shape in shapes.items()}, path)


def _write_llm(out: Path, sizes: dict[str, Any], gen: Any) -> None:
    """An HF LLaMA folder: config.json, a SentencePiece tokenizer, fp16 safetensors shards + index."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.demo_weights import _train_tokenizer

    _train_tokenizer(out, 512)
    config = LlamaConfig(
        vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False, **sizes["llm"],
    )  # fmt: skip
    config.dtype = torch.float16
    config.save_pretrained(out)
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in names.items():
        size = 2 * int(torch.Size(shape).numel())
        if shards[-1] and used + size > sizes["shard_bytes"]:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: _fill(names[k], k, gen) for k in keys}, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, file)
    total = sum(2 * int(torch.Size(s).numel()) for s in names.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------- measuring (a fresh process)


def _status_bytes(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(keys: dict[str, Any], device: str, dtype: str, new_tokens: int) -> dict[str, Any]:
    """Load ``keys`` through ``model.load_minigpt4`` and answer one question; the numbers as a dict."""
    import resource

    import accelerate  # noqa: F401 — the loader's imports, so the baseline holds them
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401

    from model import load_minigpt4
    from model.generate import ChatSession, default_options
    from model.image_processing import builtin_test_image
    from model.report import describe_weights

    cuda = device.startswith("cuda")
    baseline = _status_bytes("VmRSS") or 0
    if not _reset_peak():
        baseline = 0  # ru_maxrss below is then the whole process's peak
    started = time.perf_counter()
    model = load_minigpt4(**keys, device=device, dtype=dtype)
    load_s = time.perf_counter() - started
    peak = _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = describe_weights(model, context_tokens=2000)
    result: dict[str, Any] = dict(
        device=str(model.device), dtype=str(model.llm_dtype).removeprefix("torch."), load_s=round(load_s, 2),
        weights_bytes=weights.weights_bytes, baseline_rss=baseline, peak_rss=peak,
        peak_over_baseline=peak - baseline, ratio=round((peak - baseline) / weights.weights_bytes, 3),
        gpu_peak=torch.cuda.max_memory_allocated() if cuda else None,
    )  # fmt: skip
    print(json.dumps(result), flush=True)  # the load's numbers survive an answer that runs out of time
    session = ChatSession(model, default_options(model, do_sample=False, max_new_tokens=new_tokens))
    started = time.perf_counter()
    session.add_image(builtin_test_image())
    text = "".join(session.ask("Describe this image in detail."))
    answer_s = time.perf_counter() - started
    tokens = len(session.last.token_ids)
    result |= dict(
        answer_tokens=tokens, answer_s=round(answer_s, 2), tokens_per_s=round(tokens / max(answer_s, 1e-9), 3),
        answer_chars=len(text), peak_rss_after_answer=_status_bytes("VmHWM"),
        gpu_peak_after_answer=torch.cuda.max_memory_allocated() if cuda else None,
    )  # fmt: skip
    return result


def machine() -> str:
    """CPU model, cores, memory and torch version (for the README's table)."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM{gpu}, torch {torch.__version__}"


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _table(shape: str, write_s: float, files: int, r: dict[str, Any]) -> str:
    rows = [
        ("files written (original layouts, fp16)", f"{_gib(files)} in {write_s:.0f} s"),
        ("loaded as", f"{r['device']}, {r['dtype']} (ViT/LLM; ln_vision, Q-Former, projection float32)"),
        ("load time", f"{r['load_s']:.1f} s"),
        ("loaded weights", _gib(r["weights_bytes"])),
        ("peak RSS while loading, over the baseline", f"{_gib(r['peak_over_baseline'])} ({r['ratio']:.2f}×)"),
        ("baseline RSS (after imports)", _gib(r["baseline_rss"])),
        ("peak RSS after the answer (absolute)", _gib(r["peak_rss_after_answer"])),
        ("peak GPU memory (load / answer)", f"{_gib(r['gpu_peak'])} / {_gib(r['gpu_peak_after_answer'])}"),
        ("one answer", f"{r['answer_tokens']} tokens in {r['answer_s']:.1f} s = {r['tokens_per_s']:.2f} tok/s"),
    ]
    lines = [f"| {shape} | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    return "\n".join(lines)


def _write_in_child(folder: Path, shape: str) -> None:
    """``write_weights`` in its own process: the writer's memory is not the loader's."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from benchmarks.load import write_weights; out = Path(sys.argv[2]); "
        "(out / 'keys.json').write_text(json.dumps(write_weights(out, sys.argv[3])))"
    )
    subprocess.run([sys.executable, "-c", code, str(ROOT), str(folder), shape], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="write the files here and keep them (reused if there)")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # the child's entry
    args = parser.parse_args()
    new_tokens = args.new_tokens or SHAPES[args.shape]["new_tokens"]
    if args.measure is not None:
        keys = json.loads((args.measure / "keys.json").read_text())
        sys.stdout.write(json.dumps(measure(keys, args.device, args.dtype, new_tokens)) + "\n")
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix=f"minigpt4-load-{args.shape}-"))
    try:
        started = time.perf_counter()
        if not (folder / "keys.json").is_file():  # a kept folder is written once, then reused
            _write_in_child(folder, args.shape)
        write_s = time.perf_counter() - started
        files = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        child = [sys.executable, __file__, "--shape", args.shape, "--device", args.device, "--dtype", args.dtype]
        child += ["--new-tokens", str(new_tokens), "--measure", str(folder)]
        done = subprocess.run(child, check=True, capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    result |= dict(shape=args.shape, files_bytes=files, write_s=round(write_s, 1), machine=machine(), bound=BOUND)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    print(f"machine: {result['machine']}")
    print(_table(args.shape, write_s, files, result))


if __name__ == "__main__":
    main()
