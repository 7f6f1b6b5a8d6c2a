"""The vLLM worker: one ``AsyncLLM`` in the vLLM environment, served to bot processes over loopback HTTP.

``python -m model.vllm_plugin.worker --model DIR --port N`` (run with ``.venv-vllm/bin/python``; the bot's
``[vllm] serve = true`` starts it).  vLLM lives in its own environment because its pins
(``transformers<5.20``) conflict with the bot's (``>=5.24``); this process is the boundary.

Why not vLLM's own OpenAI server: the bot sends *token ids it built itself* (the reference prompt,
segmented at ``<ImageHere>`` exactly as the local engine tokenises it, then cut from the left by
``max_length``) together with the thread's *pictures*.  The Completions API takes token ids but no
pictures; the Chat API takes pictures but renders text through a chat template (so not the bot's ids
and not its left cut); the token-in/token-out ``/generate`` endpoint takes pictures only as features
pre-rendered by a separate render server.  None streams token ids with ``num_cached_tokens`` per
request.  This worker is the thin rest: ~200 lines over ``AsyncLLM``.

Protocol (JSON in, NDJSON out):

* ``POST /generate`` ``{"request_id", "prompt_token_ids", "images": [base64], "user", "options"}`` →
  one JSON line per engine step ``{"token_ids": [...]}``; the last line also carries
  ``finish_reason`` (``stop`` | ``length`` | ``abort``), ``prompt_tokens`` and ``num_cached_tokens``.
  An error is one line ``{"error": kind, "detail": ...}`` (``invalid``, ``too_large``,
  ``too_many_images`` (more than ``--limit-images``), ``busy``, ``failed``).  The client closing the
  connection aborts the vLLM request (its slot frees).
* ``GET /health``: 200 with model facts once the engine runs, 503 when it died.
* ``GET /stats``: running / waiting (vLLM's scheduler), unfinished (requests this worker still
  streams), prefix-cache queries and hits (tokens), the last request's cached tokens.

Fairness: ``scheduling_policy = "priority"``; a request's priority is how many requests its user
already has in this worker (lower runs first), so one user's burst queues behind everyone's first
answer — across every bot process sharing the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import sys
from collections import Counter
from typing import Any

log = logging.getLogger("minigpt4.vllm_worker")

__all__ = ["main"]


def _cpu_environment(args: argparse.Namespace) -> None:
    """vLLM's CPU knobs, set before vLLM is imported: the threads its worker may use (all of them, none reserved)."""
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # whole GiB only: kv_cache_memory_bytes takes fractions
    if args.threads:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")


class _Stats:
    """The last scheduler gauges vLLM reported (a custom stat logger), plus prefix-cache totals."""

    running = 0
    waiting = 0
    queries = 0
    hits = 0


def _stat_logger() -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class Logger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
            if scheduler_stats is None:
                return
            _Stats.running = scheduler_stats.num_running_reqs
            _Stats.waiting = scheduler_stats.num_waiting_reqs
            prefix = scheduler_stats.prefix_cache_stats
            _Stats.queries += prefix.queries
            _Stats.hits += prefix.hits

        def log_engine_initialized(self) -> None:
            pass

    return Logger


class Worker:
    """The HTTP handlers over one engine."""

    def __init__(self, engine: Any, args: argparse.Namespace) -> None:
        self.engine = engine
        self.args = args
        self.users: Counter[str] = Counter()
        self.last_cached_tokens = 0
        config = engine.model_config
        hf = config.hf_config
        self.facts = {
            "model": args.model,
            "max_model_len": config.max_model_len,
            "dtype": str(config.dtype).removeprefix("torch."),
            "image_token_id": getattr(hf, "image_token_id", None),
            "num_image_tokens": getattr(hf, "num_image_tokens", None),
            "architectures": list(getattr(hf, "architectures", None) or []),
            "max_num_seqs": args.max_num_seqs,
            "limit_mm_per_prompt": args.limit_images,
            "block_size": engine.vllm_config.cache_config.block_size,
            "pid": os.getpid(),
        }

    async def health(self, request: Any) -> Any:
        from aiohttp import web

        if self.engine.errored:
            return web.json_response({"ok": False, "detail": "the vLLM engine died"}, status=503)
        return web.json_response({"ok": True, **self.facts})

    async def stats(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(
            {
                "running": _Stats.running,
                "waiting": _Stats.waiting,
                "unfinished": self.engine.output_processor.get_num_unfinished_requests(),
                "prefix_cache_queries": _Stats.queries,
                "prefix_cache_hits": _Stats.hits,
                "last_cached_tokens": self.last_cached_tokens,
                "users": dict(self.users),
            }
        )

    def _prompt(self, body: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        prompt: dict[str, Any] = {"prompt_token_ids": [int(i) for i in body["prompt_token_ids"]]}
        raw = [base64.b64decode(b) for b in body.get("images") or ()]
        if raw:
            images = []
            for index, data in enumerate(raw):
                try:
                    images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                except Exception as exc:
                    raise _Rejected("image", f"picture {index} cannot be decoded: {exc}", index) from exc
            prompt["multi_modal_data"] = {"image": images}
            prompt["multi_modal_uuids"] = {"image": [hashlib.sha256(data).hexdigest() for data in raw]}
        return prompt

    def _line(self, out: Any) -> dict[str, Any]:
        line: dict[str, Any] = {"token_ids": list(out.outputs[0].token_ids)}
        if out.finished:
            self.last_cached_tokens = int(out.num_cached_tokens or 0)
            line |= {
                "finish_reason": out.outputs[0].finish_reason,
                "prompt_tokens": len(out.prompt_token_ids or ()),
                "num_cached_tokens": self.last_cached_tokens,
            }
        return line

    async def generate(self, request: Any) -> Any:
        from aiohttp import web
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        from model.vllm_plugin.worker_sampling import sampling_params

        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        user = str(body.get("user", ""))
        priority = self.users[user]
        self.users[user] += 1
        try:
            prompt = self._prompt(body)
            params = sampling_params(body["options"])
            outputs = self.engine.generate(prompt, params, str(body["request_id"]), priority=priority)
            try:
                async for out in outputs:
                    await response.write(json.dumps(self._line(out)).encode() + b"\n")
            finally:  # the client left (a failed write, a cancelled handler): closing aborts the vLLM request
                await outputs.aclose()
        except _Rejected as exc:
            await _error_line(response, exc.kind, exc.detail, image_index=exc.index)
        except EngineDeadError as exc:
            log.error("the vLLM engine died: %s", exc)
            await _error_line(response, "failed", "the vLLM engine died")
            asyncio.get_running_loop().call_later(0.5, os._exit, 1)  # a supervisor (the bot) restarts it
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client left: AsyncLLM.generate aborted the request as its generator closed
        except (ValueError, VLLMClientError) as exc:  # vLLM's validation: longer than max_model_len, bad options
            await _error_line(response, _value_error_kind(str(exc)), str(exc))
        except Exception as exc:
            log.exception("request %s failed", body.get("request_id"))
            await _error_line(response, "failed", repr(exc))
        finally:
            self.users[user] -= 1
            if self.users[user] <= 0:
                del self.users[user]
        return response


def _value_error_kind(message: str) -> str:
    """vLLM's ``ValueError`` for one request, as the protocol's error kind."""
    if "maximum model length" in message or "maximum context length" in message:  # vLLM words it both ways
        return "too_large"
    if "may be provided in one prompt" in message:  # more pictures than --limit-images
        return "too_many_images"
    return "invalid"


class _Rejected(Exception):
    def __init__(self, kind: str, detail: str, index: int | None = None) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.index = kind, detail, index


async def _error_line(response: Any, kind: str, detail: str, **extra: Any) -> None:
    await response.write(json.dumps({"error": kind, "detail": detail, **extra}).encode() + b"\n")


def build_engine(args: argparse.Namespace) -> Any:
    """``AsyncLLM`` for the exported model folder, with the reference's penalty and priority scheduling."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from model.vllm_plugin.worker_sampling import QUALNAME

    engine_args = AsyncEngineArgs(
        model=args.model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
        max_model_len=args.max_model_len or None,
        limit_mm_per_prompt={"image": args.limit_images},
        enable_prefix_caching=args.prefix_caching,
        block_size=args.block_size or None,
        scheduling_policy="priority",
        logits_processors=[QUALNAME],
        enforce_eager=args.enforce_eager,
        seed=0,
        disable_log_stats=True,
    )
    return AsyncLLM.from_engine_args(engine_args, stat_loggers=[_stat_logger()])


async def serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    engine = build_engine(args)
    worker = Worker(engine, args)
    app = web.Application(client_max_size=256 * 2**20)
    app.router.add_get("/health", worker.health)
    app.router.add_get("/stats", worker.stats)
    app.router.add_post("/generate", worker.generate)
    runner = web.AppRunner(app, handle_signals=True, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"minigpt4 vllm worker ready on http://{args.host}:{args.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        engine.shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the exported model folder (minigpt4-bot weights export)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=0)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0, help="CPU: threads for vLLM's worker (0 = vLLM's choice)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--limit-images", type=int, default=4,
                        help="pictures per prompt; vLLM profiles its start-up for this many")  # fmt: skip
    parser.add_argument("--block-size", type=int, default=0, help="KV-cache block in tokens (0 = vLLM's default)")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                        help="every request re-prefills its whole prompt (measurements only)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    _cpu_environment(args)
    asyncio.run(serve(args))


if __name__ == "__main__":  # vLLM starts its engine processes by spawn: the guard is required
    main()
