"""The reference's serving loop vs the local engine vs the vLLM backend: throughput, time to first token, memory.

Baseline = what the reference demo does: one request at a time (Gradio queue of 1), the
whole history re-rendered and re-prefilled every turn, ``LlamaForCausalLM.generate
(inputs_embeds=…)`` with the image encoded once per thread.  The engine runs the same
threads concurrently with continuous batching and image / KV-prefix reuse.  ``vllm`` is the
bot's vLLM backend (``[engine] backend = "vllm"``: a worker in ``.venv-vllm`` serving the same
random weights exported as a vLLM model folder, driven through ``VllmBackend.stream``).  All
use the same random weights and greedy decoding with a fixed answer length.

    python benchmarks/engine.py --small                   # CPU, small shapes (~15 minutes on 2 cores)
    python benchmarks/engine.py --shape 7b --device cuda  # GPU, real Vicuna-7B shapes, fp16

The systems themselves are in ``engine_systems.py``.  Each (system, threads) cell runs in its
own process (and, for vllm, its own worker) so peak memory is its own.  A second table compares
a follow-up's TTFT with prefix reuse against a full re-prefill at a ~1,000-token history, for the
engine and for vLLM (prefix caching on vs off).  On a GPU a last column gives each cell's decode
throughput as a fraction of the memory-bandwidth bound (every generated token of a batch reads
all LLM weights once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import engine_systems  # noqa: E402
from _workload import image as _image  # noqa: E402
from _workload import pct as _pct  # noqa: E402
from _workload import turns as _turns  # noqa: E402


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(args: argparse.Namespace):
    import torch
    from _models import random_minigpt4

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    return random_minigpt4(args.shape, args.device, dtype)


# ----------------------------------------------------------------------------- orchestration


async def run_vllm_cell(args: argparse.Namespace) -> dict:
    """One vllm cell: a fresh worker (two for the follow-up: prefix caching on, then off)."""
    import tempfile

    import _vllm

    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as data:
        if args.system == "vllm":
            backend = await _vllm.start(Path(args.vllm_model), Path(data), args.device, args.threads)
            try:
                result = await _vllm.run(backend, args.threads, args.max_new)
                result["peak_mb"] = _vllm.peak_mb(backend, args.device)
            finally:
                await backend.close()
            return result
        result = {}
        for caching in (False, True):
            backend = await _vllm.start(Path(args.vllm_model), Path(data), args.device, 1, prefix_caching=caching)
            try:
                follow = await _vllm.follow_up(backend, args.history, args.max_new)
            finally:
                await backend.close()
            result["reuse" if caching else "full"] = follow["ttft"]
            result["context"], result[f"reused_{caching}"] = follow["context"], follow["reused"]
        return result


def worker(args: argparse.Namespace) -> None:
    import torch

    from model.generate import default_options

    if args.system.startswith("vllm"):
        print("RESULT " + json.dumps(asyncio.run(run_vllm_cell(args))))
        return
    from model.engine.threads import apply_thread_settings, thread_settings

    engine_systems.TORCH_THREADS, engine_systems.MAX_PREFILLS = args.torch_threads, args.max_prefills
    apply_thread_settings(thread_settings(args.torch_threads))  # every system runs with the engine's settings
    torch.manual_seed(0)
    model = _load(args)
    if args.tune_all and args.device == "cpu":  # the engine's CPU tuning for the peers too (it does its own)
        from model.engine.cpu_tuning import keep_freed_memory, lay_out_for_cpu

        keep_freed_memory()
        lay_out_for_cpu(model)
    warm = default_options(model, do_sample=False, max_new_tokens=2, stop_strings=())
    if args.system in ("engine", "followup"):
        asyncio.run(_warmup(model, warm))  # the engine's start also tunes a CPU host (model.engine.cpu_tuning)
    else:  # plain transformers, as the reference runs it: an engine here would tune the shared model
        from model.generate import generate
        from model.image_processing import load_image

        generate(model, [model.context_embeddings(model.build_prompt(_turns([], 0)),
                                                  model.encode_pil([load_image(_image(0))]))], warm)  # fmt: skip
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if args.system == "followup":
        result = asyncio.run(engine_systems.run_follow_up(model, args.history, args.max_new))
    else:
        systems = engine_systems
        run = {"baseline": systems.run_baseline, "engine": systems.run_engine, "static": systems.run_static}
        result = asyncio.run(systems.with_lag(run[args.system], model, args.threads, args.max_new))
    result["peak_mb"] = _peak_mb(args.device)
    print("RESULT " + json.dumps(result))


async def _warmup(model, opts) -> None:
    from model.engine import Engine, EngineRequest

    async with Engine(model) as engine:
        await engine.generate(EngineRequest(turns=_turns([], 0), images=[_image(0)], options=opts))


def _cell(args: argparse.Namespace, system: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--threads", str(threads), "--shape", args.shape,
           "--device", args.device, "--max-new", str(args.max_new), "--history", str(args.history),
           "--vllm-model", args.vllm_model, "--torch-threads", str(args.torch_threads),
           "--max-prefills", str(args.max_prefills), *(["--tune-all"] if args.tune_all else [])]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{system} x{threads} failed:\n{out.stderr[-3000:]}")


# Peak memory bandwidth (GB/s) of GPUs by name, for the bound; --bandwidth-gbs overrides.
BANDWIDTH_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000,
                 "H100 NVL": 3900, "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555,
                 "L40S": 864, "A10": 600}  # fmt: skip


def _bandwidth(args: argparse.Namespace) -> tuple[float, str]:
    """(GB/s, the GPU's name) for the bandwidth bound; (0, "") on a CPU or an unknown GPU without the flag."""
    if not args.device.startswith("cuda"):
        return 0.0, ""
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True, check=False).stdout.splitlines()  # fmt: skip
    name = out[0].strip() if out else "?"
    if args.bandwidth_gbs:
        return args.bandwidth_gbs, name
    known = next((gbs for key, gbs in BANDWIDTH_GBS.items() if key in name), 0.0)
    return float(known), name


def _llm_bytes(shape: str) -> float:
    """The LLM's fp16 weight bytes (what one decode step of a batch reads from memory)."""
    from _models import SHAPES

    llm = SHAPES[shape]["llm"]
    h, i, n, vocab = llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"], 32000
    return 2.0 * (n * (4 * h * h + 3 * h * i + 2 * h) + 2 * vocab * h + h)


def _vllm_ready() -> bool:
    return (ROOT / ".venv-vllm" / "bin" / "python").is_file()


def _export(args: argparse.Namespace) -> None:
    """The random weights as one vLLM model folder, once per run (the cells share it)."""
    import tempfile

    import _vllm

    if not args.vllm_model:
        args.vllm_model = tempfile.mkdtemp(prefix="bench-vllm-model-")
    dtype = "float16" if args.device.startswith("cuda") else "float32"
    _vllm.export_random(args.shape, Path(args.vllm_model) / args.shape, dtype)
    args.vllm_model = str(Path(args.vllm_model) / args.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU, small shapes (same as --shape small --device cpu)")
    parser.add_argument("--shape", default="small", choices=["small", "7b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, nargs="*", default=None, help="default 1 4 16 64 (GPU: 1 4 16 32 64)")
    parser.add_argument("--systems", nargs="*", default=["baseline", "engine", "static", "vllm"],
                        choices=["baseline", "engine", "static", "vllm"])  # fmt: skip
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--history", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=1, help="runs per cell (the table gives median and worst)")
    parser.add_argument("--busy", type=int, default=0, help="CPU-bound processes of its own running beside it")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="[engine] threads for every system (0: derived, as the engine does)")  # fmt: skip
    parser.add_argument("--max-prefills", type=int, default=4,
                        help="the engine's [engine] max_prefills_per_step (default 4, the bot's)")  # fmt: skip
    parser.add_argument(
        "--tune-all",
        action="store_true",
        help="CPU: give baseline and static the engine's CPU tuning too (weight layout, malloc)",
    )
    parser.add_argument("--vllm-model", default="", help="folder for the exported random weights (default: a temp dir)")
    parser.add_argument("--bandwidth-gbs", type=float, default=0.0, help="GPU memory bandwidth for the bound")
    parser.add_argument("--worker", choices=["baseline", "engine", "static", "followup", "vllm", "vllm-followup"],
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.small:
        args.shape, args.device = "small", "cpu"
    if args.threads is None:
        args.threads = [1, 4, 16, 32, 64] if args.device.startswith("cuda") else [1, 4, 16, 64]
    if args.worker:
        args.system = args.worker
        args.threads = args.threads[0]
        worker(args)
        return
    busy = _start_busy(args.busy)
    try:
        _tables(args)
    finally:  # also on Ctrl-C and SIGTERM
        _stop_busy(busy)


def _start_busy(count: int) -> list[subprocess.Popen]:
    """``count`` CPU-bound processes (a busy neighbour on the host); SIGTERM ends this run cleanly too."""

    def _terminated(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminated)
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def _stop_busy(busy: list[subprocess.Popen]) -> None:
    for proc in busy:
        proc.kill()
    for proc in busy:
        proc.wait()


def _row(threads: int, name: str, runs: list[dict], ratios: list[float], bound: float) -> str:
    """One table row: median (worst) over the runs; TTFT pooled over the runs; the worst run's loop-lag p99."""
    tps = [r["tokens"] / r["elapsed"] for r in runs]
    first = [x for r in runs for x in r["first"]]
    follow = [x for r in runs for x in r["follow"]]
    lag = max(_pct(r.get("lag", []), 0.99) for r in runs) * 1e3
    frac = f" {statistics.median(tps) / (bound * threads):.0%} |" if bound else ""
    worst = f" ({min(tps):.1f})" if len(runs) > 1 else ""
    worst_ratio = f" ({min(ratios):.2f}x)" if len(runs) > 1 else ""
    speed = f"{statistics.median(tps):.1f}{worst} | {statistics.median(ratios):.2f}x{worst_ratio}"
    return (f"| {threads} | {name} | {speed} | "
            f"{_pct(first, .5):.3f} / {_pct(first, .95):.3f} | {_pct(follow, .5):.3f} / {_pct(follow, .95):.3f} | "
            f"{lag:.0f} | {max(r['peak_mb'] for r in runs):.0f} |{frac}")  # fmt: skip


def _peers(args: argparse.Namespace) -> str:
    return "with the engine's CPU tuning" if args.tune_all else "plain transformers"


def _tables(args: argparse.Namespace) -> None:
    from model.engine.threads import thread_settings

    systems = list(args.systems)
    if "vllm" in systems and not _vllm_ready():
        print("# vllm skipped: no .venv-vllm (./scripts/setup.sh --vllm)")
        systems.remove("vllm")
    if "vllm" in systems:
        _export(args)
    gbs, gpu = _bandwidth(args)
    bound = gbs * 1e9 / _llm_bytes(args.shape) if gbs else 0.0  # tokens/s of ONE stream if decode only read weights

    print(f"# engine benchmark: shape={args.shape} device={args.device}{' (' + gpu + ')' if gpu else ''} "
          f"answer={args.max_new} tokens, 3 turns/thread, runs={args.runs}, busy={args.busy}, "
          f"max_prefills_per_step={args.max_prefills}, peers {_peers(args)}, "
          f"torch {thread_settings(args.torch_threads).describe()}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("# tok/s and speed-up: median over the runs (worst); speed-up against the first system of the same run;")
    print("# loop lag: p99 overshoot of a 10 ms asyncio sleep while the cell runs (worst run)")
    print()
    header = "| threads | system | gen tok/s | speed-up | TTFT first p50 / p95 (s) | TTFT follow-up p50 / p95 (s) |"
    print(header + " loop lag p99 (ms) | peak MB |" + (" of bandwidth bound |" if bound else ""))
    print("|---:|---|---:|---:|---|---|---:|---:|" + ("---:|" if bound else ""))
    for threads in args.threads:
        runs: dict[str, list[dict]] = {name: [] for name in systems}
        ratios: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(args.runs):  # interleaved, so a run's ratios compare cells measured minutes apart at most
            cells = {name: _cell(args, name, threads) for name in systems}
            base = next(iter(cells.values()))
            for name, r in cells.items():
                runs[name].append(r)
                ratios[name].append((r["tokens"] / r["elapsed"]) / (base["tokens"] / base["elapsed"]))
        for name in systems:
            print(_row(threads, name, runs[name], ratios[name], bound))
        sys.stdout.flush()
    print()
    print(
        "| system | follow-up at history | full re-prefill TTFT (s) | with prefix reuse (s) | ratio | tokens reused |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, system in (("engine", "followup"), ("vllm", "vllm-followup")):
        if name not in systems:
            continue
        follow = _cell(args, system, 1)
        print(f"| {name} | {follow['context']} tokens | {follow['full']:.4f} | {follow['reuse']:.4f} | "
              f"{follow['reuse'] / follow['full']:.2f} | {follow['reused_True']} |")  # fmt: skip
        sys.stdout.flush()


if __name__ == "__main__":
    main()
