"""Scale-out: the engine as 1 vs 2 Ray Serve replicas, conversation affinity on vs off.

N conversations run at once, each a picture and three turns (the first, then two follow-ups after a
user's pause, ``--think-s`` on average), through the same :class:`~model.engine.ray_client.RayServeBackend`
the bot uses (one ``DeploymentHandle``, streaming, ``session_id`` = the conversation).  Per cell:
aggregate generated tokens/s, TTFT measured by the caller (request sent → first token back, so routing
and queueing count), the share of the follow-ups' prompt tokens that came from a KV prefix already
on the replica they reached (a stale prefix of an earlier turn counts for what it covers), and the CPU
the calling bot process itself used (cores: CPU seconds per second) — on a small machine it competes
with the replicas.

    python benchmarks/scale.py --small                       # CPU, small shapes, local Ray (a few minutes)
    python benchmarks/scale.py --conversations 16 --max-new 8

Weights are random (``model.demo_weights`` with the small benchmark shapes of ``benchmarks/_models.py``:
ViT 192x4, Q-Former 128x2 with 32 queries, LLaMA 256x4), written once and loaded by every replica.  On
CPU each replica is given ``--cpus-per-replica`` CPUs (its torch threads), so "2 replicas" also means
twice the cores, as two GPUs would.  Each cell deploys a fresh application (replicas loaded, then warmed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _workload import TURNS  # noqa: E402
from _workload import image as _image  # noqa: E402
from _workload import pct as _pct  # noqa: E402
from _workload import turns as _turns  # noqa: E402


def _small_weights(folder: Path) -> dict[str, Any]:
    """The small benchmark shapes as files in the original layouts (loader keyword arguments)."""
    from model.demo_weights import DemoSizes, write_demo_weights
    from model.variants import QFormerDims, VisionDims

    sizes = DemoSizes(
        vision=VisionDims(img_size=224, patch_size=14, width=192, depth=4, heads=4, mlp_hidden=768),
        qformer=QFormerDims(hidden=128, layers=2, heads=4, intermediate=256, num_query_token=32, encoder_width=192),
        llm_hidden=256, llm_layers=4, llm_heads=4, llm_intermediate=688,
    )  # fmt: skip
    return write_demo_weights(folder, "vicuna0", sizes=sizes).loader_kwargs()


async def _conversations(backend: Any, n: int, max_new: int, think_s: float, prefix: str = "bench") -> dict[str, Any]:
    import random

    options = {"do_sample": False, "max_new_tokens": max_new, "min_length": max_new + 1, "repetition_penalty": 1.0}
    first: list[float | None] = []
    follow: list[float | None] = []
    reused = prompt = tokens = 0
    pause = random.Random(n)

    async def conversation(i: int) -> None:
        nonlocal tokens, reused, prompt
        done: list[str] = []
        image = _image(i)
        for k in range(len(TURNS)):
            if k and think_s:
                await asyncio.sleep(pause.uniform(0, 2 * think_s))  # the user reads the answer
            sent = time.perf_counter()
            ttft = None
            async for event in backend.stream(turns=_turns(done, k), images=[image], conversation_id=f"{prefix}-{i}",
                                              user=f"u{i}", options=options):  # fmt: skip
                if ttft is None:
                    ttft = time.perf_counter() - sent
                final = event
            (first if k == 0 else follow).append(ttft)
            if k:
                reused += final.reused_prefix_tokens
                prompt += final.prompt_tokens
            tokens += final.completion_tokens
            done.append(final.text or "ok")

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(conversation(i) for i in range(n)))
    elapsed = time.perf_counter() - start
    return {"tps": tokens / elapsed, "first": first, "follow": follow, "reused": reused / max(1, prompt),
            "client_cpu": (time.process_time() - cpu) / elapsed}  # fmt: skip


def _cell(args: argparse.Namespace, weights: dict[str, Any], replicas: int, affinity: bool, n: int) -> dict:
    from ray import serve

    from bot.cli.ray_backend import RaySettings, deployment_options
    from model.engine import EngineConfig, SchedulerConfig
    from model.engine.ray_client import RayServeBackend
    from model.engine.ray_replica import ReplicaSpec, build_app

    slots = max(args.conversations)
    engine = EngineConfig(scheduler=SchedulerConfig(max_batch=slots, max_queue=1024, max_running_per_user=4,
                                                    max_wait_s=3600, kv_budget_tokens=1_000_000))  # fmt: skip
    spec = ReplicaSpec(loader_kwargs={**weights, "device": args.device}, engine=engine, timeout_s=600)
    name = f"scale-bench-{n}-{replicas}-{'on' if affinity else 'off'}"  # a new app (and router) per cell
    ray_table = RaySettings(app_name=name, replicas=replicas, num_cpus=args.cpus_per_replica,
                            num_gpus=1.0 if args.device.startswith("cuda") else 0.0, max_ongoing_requests=slots,
                            max_queued_requests=-1, affinity=affinity)  # fmt: skip
    options = deployment_options(ray_table, max_batch=slots)
    handle = serve.run(build_app(spec, options), name=options.app_name, route_prefix=None)
    backend = RayServeBackend(handle, app_name=options.app_name)

    async def run() -> dict[str, Any]:
        await _conversations(backend, 4 * replicas, 2, 0.0, prefix="warm")  # warm every replica (first calls)
        return await _conversations(backend, n, args.max_new, args.think_s)

    result = asyncio.run(run())
    (router,) = backend.routers()
    assert router.affinity is affinity
    serve.delete(options.app_name)
    return result


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one cell: the median tokens/s and caller CPU, every latency sample, the mean reuse."""
    return {
        "tps": statistics.median(r["tps"] for r in runs),
        "first": [x for r in runs for x in r["first"]],
        "follow": [x for r in runs for x in r["follow"]],
        "reused": statistics.fmean(r["reused"] for r in runs),
        "client_cpu": statistics.median(r["client_cpu"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU, small shapes (the default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--conversations", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--max-new", type=int, default=16)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--think-s", type=float, default=0.5, help="mean pause before a follow-up (uniform 0-2x)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell (medians of tokens/s; latencies pooled)")
    parser.add_argument("--address", default="", help="an existing Ray cluster (default: start a local one)")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    cpus = max(4, os.cpu_count() or 2)
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 2**20)
    from ray import serve

    serve.start(proxy_location="Disabled")
    folder = Path(tempfile.mkdtemp(prefix="minigpt4-scale-bench-"))
    weights = _small_weights(folder)
    cells = [(1, True), (2, True), (2, False)]
    print(f"# scale benchmark: device={args.device}, {os.cpu_count()} cores, {args.cpus_per_replica:g} CPU per "
          f"replica, answer={args.max_new} tokens, 3 turns per conversation, {args.think_s:g} s mean pause before a "
          f"follow-up, median of {args.repeat} runs per cell, Ray {ray.__version__}")  # fmt: skip
    print()
    print("| conversations | replicas | affinity | gen tok/s | vs 1 replica | TTFT first p50 (s) | "
          "TTFT follow-up p50 / p95 (s) | follow-up prompt from KV prefix | caller CPU (cores) |")  # fmt: skip
    print("|---:|---:|---|---:|---:|---:|---|---:|---:|")
    ratios = []
    try:
        for n in args.conversations:
            runs: dict[tuple[int, bool], list[dict[str, Any]]] = {cell: [] for cell in cells}
            for _ in range(args.repeat):  # the cells interleaved, so slow drifts of the machine hit all of them
                for replicas, affinity in cells:
                    runs[(replicas, affinity)].append(_cell(args, weights, replicas, affinity, n))
            results = {cell: _merge(rs) for cell, rs in runs.items()}
            base = results[(1, True)]["tps"]
            for replicas, affinity in cells:
                r = results[(replicas, affinity)]
                print(f"| {n} | {replicas} | {'on' if affinity else 'off'} | {r['tps']:.1f} | {r['tps'] / base:.2f}x | "
                      f"{_pct(r['first'], .5):.3f} | {_pct(r['follow'], .5):.3f} / {_pct(r['follow'], .95):.3f} | "
                      f"{r['reused']:.0%} | {r['client_cpu']:.2f} |")  # fmt: skip
                sys.stdout.flush()
            on, off = results[(2, True)], results[(2, False)]
            ttft = statistics.median(off["follow"]) / statistics.median(on["follow"])
            ratios.append(
                f"- {n} conversations: 2 replicas give {on['tps'] / results[(1, True)]['tps']:.2f}x the tokens/s of "
                f"one; with affinity off, follow-up TTFT p50 is {ttft:.2f}x and tokens/s {off['tps'] / on['tps']:.2f}x "
                "of affinity on"
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    print()
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
