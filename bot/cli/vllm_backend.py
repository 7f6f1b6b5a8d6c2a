"""The vLLM generation backend (entry point ``vllm``): ``[engine] backend = "vllm"`` plus ``[vllm]``.

vLLM runs in its own process and environment (``.venv-vllm``, made by ``./scripts/setup.sh --vllm``):
its pins (``transformers<5.20``) must never constrain the bot's.  This module is the bot's side of
that boundary: it builds each prompt with the project's own code (the variant's template, the
tokenizer's ``<ImageHere>`` segmentation, the reference's left cut at ``max_length``), sends token
ids + pictures to the worker (:mod:`model.vllm_plugin.worker`) and turns the streamed ids back into
the local engine's events with the local engine's detokeniser and stop rule — so the text is the
same for the same ids.  ``[vllm] url`` connects to a running worker (several bot processes share one
vLLM); empty, the backend starts the worker itself and stops it at exit, and restarts it when it dies.
The worker's side — ``[vllm]``, its process, the exported model folder — is :mod:`bot.cli.vllm_worker`.

Semantics against the local engine (and what differs):

* greedy / temperature / top-p / top-k / ``min_length`` / ``max_new_tokens``: the same rules; a seed
  makes sampling reproducible in vLLM but draws another random stream than torch's.
* repetition penalty: the reference's (``{BOS} ∪ generated``, never the prompt) through a vLLM logits
  processor (:mod:`model.vllm_plugin.worker_sampling`), not vLLM's prompt-and-output penalty.
* stop strings: the local engine's check (the last 16 ids decoded) decides, on this side; vLLM also
  gets the strings so it ends the request itself.
* ``max_length``: the context is cut from the left as the reference cuts its embeddings, except that
  a cut through a picture drops the whole picture (vLLM cannot take part of an image's tokens).
* beam search (``num_beams > 1``) is refused: vLLM's V1 sampler has no beams.
* fairness: vLLM priority scheduling, a request's priority = its user's requests already in the worker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from bot.cli.vllm_worker import VllmSettings, VllmSetupError, WorkerProcess, _health, _model_dir, vllm_settings
from bot.core.backend_api import BackendPlugin, GenerationBackend
from bot.core.config import Settings
from model.engine.contract import (
    Busy,
    ChatTurn,
    FinalEvent,
    RequestFailed,
    RequestRejected,
    RequestTooLarge,
    StreamArgs,
    TokenEvent,
    stream_method,
)

if TYPE_CHECKING:
    import aiohttp

    from model.text import TextCodec
    from model.variants import VariantSpec

__all__ = ["VLLM", "VllmBackend", "VllmSettings", "VllmSetupError", "cut_left"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptPlan:
    """One request's prompt as the worker takes it: ids with one image id per picture, and those pictures."""

    token_ids: list[int]
    images: list[bytes]
    cut: int


def cut_left(
    segments: Sequence[list[int]], images: Sequence[bytes], image_token_id: int, image_tokens: int, budget: int
) -> PromptPlan:
    """Join segments and pictures; drop from the left what exceeds ``budget`` positions (the reference's
    ``max_length`` rule), a picture wholly when the cut runs through it."""
    items: list[tuple[str, Any]] = []
    for i, ids in enumerate(segments):
        items.extend(("t", t) for t in ids)
        if i < len(images):
            items.append(("img", images[i]))
    total = sum(image_tokens if kind == "img" else 1 for kind, _ in items)
    excess, cut, start = total - budget, 0, 0
    while excess > 0 and start < len(items):
        size = image_tokens if items[start][0] == "img" else 1
        excess, cut, start = excess - size, cut + size, start + 1
    kept = items[start:]
    ids = [image_token_id if kind == "img" else value for kind, value in kept]
    return PromptPlan(ids, [value for kind, value in kept if kind == "img"], cut)


class VllmBackend:
    """Streams answers from a vLLM worker over loopback HTTP (see the module docstring)."""

    def __init__(self, settings: Settings, codec: TextCodec, spec: VariantSpec, worker: WorkerProcess | None,
                 url: str, facts: dict[str, Any]) -> None:  # fmt: skip
        import aiohttp

        self.settings, self.vllm = settings, vllm_settings(settings)
        self.codec, self.spec, self.worker, self.url, self.facts = codec, spec, worker, url, facts
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        self._stats: dict[str, Any] = {}
        self._ids = itertools.count()
        self._closed = False
        self._poller = asyncio.create_task(self._poll())

    # ------------------------------------------------------------------ answering

    def _plan(self, turns: Sequence[ChatTurn], images: Sequence[bytes], options: Any) -> PromptPlan:
        from model.conversation import IMAGE_PLACEHOLDER, build_prompt

        try:
            prompt = build_prompt(self.spec.template, turns)
        except ValueError as exc:
            raise RequestRejected("invalid", str(exc)) from exc
        if prompt.count(IMAGE_PLACEHOLDER) != len(images):
            raise RequestRejected(
                "invalid", f"{prompt.count(IMAGE_PLACEHOLDER)} placeholder(s), {len(images)} image(s)"
            )
        image_id = self.facts.get("image_token_id")
        if images and image_id is None:
            raise RequestRejected("invalid", f"the vLLM model {self.facts.get('model')} takes no pictures")
        tokens = int(self.facts.get("num_image_tokens") or self.spec.num_visual_tokens)
        plan = cut_left(self.codec.segment_token_ids(prompt), images, int(image_id or -1), tokens,
                        options.max_length - options.max_new_tokens)  # fmt: skip
        if plan.cut:
            log.warning("vllm: context cut by %d tokens from the left (max_length)", plan.cut)
        limit = int(self.facts.get("limit_mm_per_prompt") or self.vllm.limit_mm_per_prompt)
        if len(plan.images) > limit:  # vLLM would refuse it; say why before sending the pictures
            raise RequestTooLarge(f"the thread holds {len(plan.images)} pictures, the vLLM worker takes at most "
                                  f"{limit} per prompt ([vllm] limit_mm_per_prompt)")  # fmt: skip
        return plan

    def _options(self, options: Mapping[str, Any]) -> Any:
        from model.sampling import GenerationOptions

        values = dict(options)
        if values.get("stop_strings") is None:
            values["stop_strings"] = self.spec.stop_strings
        parsed = GenerationOptions.create(**values)
        if parsed.num_beams > 1:
            raise RequestRejected("invalid", "beam search (num_beams > 1) is not available with the vllm backend")
        return parsed

    @stream_method
    async def stream(self, args: StreamArgs) -> AsyncIterator[TokenEvent | FinalEvent]:
        """One answer: token events, then the final event; closing the iterator aborts the vLLM request."""
        import aiohttp

        if self._closed:
            raise RequestFailed("the vllm backend is closed")
        opts = self._options(args["options"])
        plan = self._plan(args["turns"], args["images"], opts)
        request_id = f"{args['conversation_id']}-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        body = {
            "request_id": request_id,
            "prompt_token_ids": plan.token_ids,
            "images": [base64.b64encode(b).decode() for b in plan.images],
            "user": args["user"],
            "options": {
                "max_new_tokens": opts.max_new_tokens, "do_sample": opts.do_sample, "temperature": opts.temperature,
                "top_p": opts.top_p, "top_k": opts.top_k, "repetition_penalty": opts.repetition_penalty,
                "min_length": opts.min_length, "seed": opts.seed, "stop": list(opts.stop_strings),
                "bos_id": self.codec.bos_id,
            },
        }  # fmt: skip
        started = time.monotonic()
        response: aiohttp.ClientResponse | None = None
        finished = False
        try:
            try:
                response = await self.session.post(f"{self.url}/generate", json=body)
                if response.status != 200:
                    raise RequestFailed(f"the vLLM worker answered HTTP {response.status}")
                first = await asyncio.wait_for(response.content.readline(), self.vllm.max_wait_s)
            except TimeoutError:
                raise Busy("no first token from vLLM within max_wait_s", self.vllm.max_wait_s) from None
            async for event in self._events(response, first, request_id, opts, started):
                yield event
            finished = True
        except (aiohttp.ClientError, ConnectionError) as exc:
            log.error("vllm backend: the worker at %s failed request %s: %r", self.url, request_id, exc)
            raise RequestFailed(f"the vLLM worker is unreachable: {type(exc).__name__}") from exc
        finally:
            if response is not None:
                if finished:
                    response.release()
                else:  # the user left, Busy, an error: dropping the connection aborts the vLLM request
                    response.close()

    async def _events(self, response: Any, first: bytes, request_id: str, opts: Any,
                      started: float) -> AsyncIterator[TokenEvent | FinalEvent]:  # fmt: skip
        import torch

        from model.conversation import clean_answer
        from model.sampling import IncrementalDetokenizer, RowSampler

        detok = IncrementalDetokenizer(self.codec.decode, ("###", *opts.stop_strings))
        rule = RowSampler(opts, self.codec.bos_id, [self.codec.eos_id], torch.device("cpu"))
        ttft: float | None = None
        line = first
        while True:
            if not line:
                raise RequestFailed("the vLLM worker closed the stream before the answer ended")
            data = json.loads(line)
            if "error" in data:
                raise _worker_error(data)
            ids = data.get("token_ids", [])
            ended = "finish_reason" in data
            reason: str | None = None
            for n, token in enumerate(ids):
                ttft = ttft if ttft is not None else time.monotonic() - started
                rule.history.append(int(token))
                reason = rule.finish_reason(self.codec.decode)
                last = reason is not None or (ended and n == len(ids) - 1)
                text = detok.push(int(token)) + (detok.flush() if last else "")
                yield TokenEvent(request_id, len(rule.generated) - 1, int(token), text)
                if reason is not None:
                    break
            if reason is not None or ended:
                reason = reason or {"stop": "stop", "length": "length"}.get(data.get("finish_reason"), "aborted")
                break
            line = await response.content.readline()
        generated = rule.generated
        if not ended:  # the bot's stop rule ended it first: the final line's counts are not needed
            data = {}
        yield FinalEvent(
            request_id=request_id,
            finish_reason=cast(Any, reason),
            text=clean_answer(self.codec.decode(generated)),
            token_ids=tuple(generated),
            prompt_tokens=int(data.get("prompt_tokens") or 0),
            completion_tokens=len(generated),
            reused_prefix_tokens=int(data.get("num_cached_tokens") or 0),
            queued_s=ttft or 0.0,
            ttft_s=ttft,
            total_s=time.monotonic() - started,
        )

    # ------------------------------------------------------------------ health and stats

    async def _get(self, path: str, timeout: float = 3.0) -> dict[str, Any]:
        import aiohttp

        async with self.session.get(f"{self.url}{path}", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            data = await r.json()
            if r.status != 200:
                raise RuntimeError(data.get("detail", f"HTTP {r.status}"))
            return cast(dict[str, Any], data)

    async def _poll(self) -> None:
        """Every second: the worker's gauges for /metrics; a started worker that died is started again."""
        while not self._closed:
            await asyncio.sleep(1.0)
            if self.worker is not None and self.worker.exited:
                log.error("vllm: the worker exited (code %s): starting it again", self.worker.returncode)
                with contextlib.suppress(VllmSetupError):
                    self.facts = await self.worker.start()
            try:
                self._stats = await self._get("/stats")
            except Exception:
                self._stats = {}

    async def problem(self) -> str | None:
        """Readiness: ``None`` while the worker's engine answers its health check, else one line."""
        if self.worker is not None and self.worker.starting:
            return "the vLLM worker is starting"
        try:
            await self._get("/health")
        except Exception as exc:
            return f"the vLLM worker at {self.url} does not answer ({type(exc).__name__})"
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "variant": self.spec.name,
            "backend": "vllm",
            "device": "vllm",
            "dtype": self.facts.get("dtype"),
            "demo": self.settings.model.uses_demo_weights,
        }

    def stats(self) -> dict[str, Any]:
        s = self._stats
        return {
            "queue_depth": s.get("waiting", 0),
            "batch_size": s.get("running", 0),
            "prefix_cache_queries": s.get("prefix_cache_queries", 0),
            "prefix_cache_hits": s.get("prefix_cache_hits", 0),
        }

    async def worker_stats(self) -> dict[str, Any]:
        """The worker's ``/stats`` now (running, waiting, unfinished, prefix-cache counts)."""
        return await self._get("/stats")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._poller
        await self.session.close()
        if self.worker is not None:
            await self.worker.stop()


def _worker_error(data: dict[str, Any]) -> Exception:
    kind, detail = data.get("error"), str(data.get("detail", ""))
    if kind == "image":
        return RequestRejected("image", detail, image_index=data.get("image_index"))
    if kind in ("too_large", "too_many_images"):
        return RequestTooLarge(detail)
    if kind == "invalid":
        return RequestRejected("invalid", detail)
    if kind == "busy":
        return Busy(detail, 5.0)
    return RequestFailed(f"vLLM: {detail}")


def _spec(settings: Settings) -> VariantSpec:
    from model.variants import get_variant

    kwargs = settings.model.loader_kwargs()
    return get_variant(settings.model.variant).with_dims(kwargs.get("vision"), kwargs.get("qformer_dims"))


async def _create_vllm(settings: Settings, **_ignored: Any) -> GenerationBackend:
    from model.text import TextCodec

    v = vllm_settings(settings)
    worker: WorkerProcess | None = None
    if v.url:
        url = v.url
        facts = await _health(url)
        model_dir = Path(v.model_dir or facts.get("model", ""))
    else:
        model_dir = await asyncio.to_thread(_model_dir, settings)
        worker = WorkerProcess(settings, model_dir)
        url = worker.url
        facts = await worker.start()
    try:
        codec = await asyncio.to_thread(TextCodec.from_dir, model_dir)
    except Exception as exc:
        if worker is not None:
            await worker.stop()
        raise VllmSetupError(f"cannot load the tokenizer of {model_dir} (set [vllm] model_dir): {exc}") from exc
    log.info("vllm: %s, %s, up to %d answers at once", url, facts.get("model"), facts.get("max_num_seqs", 0))
    limit = int(facts.get("limit_mm_per_prompt") or v.limit_mm_per_prompt)
    if limit < settings.images.max_per_message:
        log.warning("vllm: the worker takes %d picture(s) per prompt, fewer than [images] max_per_message = %d: "
                    "raise [vllm] limit_mm_per_prompt", limit, settings.images.max_per_message)  # fmt: skip
    return VllmBackend(settings, codec, _spec(settings), worker, url, facts)


VLLM = BackendPlugin(name="vllm", create=_create_vllm, settings=VllmSettings)
