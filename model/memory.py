"""How much memory the configured weights take on a device and dtype, and how much the machine has.

The numbers come from the architecture (the variant's ViT / Q-Former sizes and the LLM's
``config.json``, built on the ``meta`` device: no weights are read), so ``weights check`` can refuse a
load that will not fit in seconds, with numbers, instead of after minutes of swapping or an OOM kill;
and ``dtype = "auto"`` on CPU can pick bfloat16 where float32 would not fit (the real 7B stack is
≈27 GB in float32, more than a 24 GB machine holds).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.variants import VariantSpec, get_variant

log = logging.getLogger(__name__)

__all__ = [
    "MemoryPlan",
    "PartEstimate",
    "auto_cpu_dtype",
    "available_memory",
    "format_bytes",
    "plan_for_settings",
    "plan_memory",
]

_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


@dataclass(frozen=True)
class PartEstimate:
    """One part of the model: its parameters and the bytes they will take once loaded."""

    name: str
    parameters: int
    dtype: str
    bytes: int


@dataclass(frozen=True)
class MemoryPlan:
    """The weights' bytes on ``device`` in ``dtype``, one thread's KV cache, and what the device has free.

    ``needed_bytes`` is weights + KV cache; ``available_bytes`` is ``None`` where it cannot be known.
    """

    device: str
    dtype: str
    parts: tuple[PartEstimate, ...]
    weights_bytes: int
    kv_bytes: int
    available_bytes: int | None

    @property
    def needed_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.needed_bytes <= self.available_bytes

    def summary(self) -> str:
        """One line with the numbers (for logs, the refusal and ``weights check``)."""
        b = format_bytes
        free = "unknown" if self.available_bytes is None else b(self.available_bytes)
        return (
            f"{b(self.weights_bytes)} of weights + {b(self.kv_bytes)} KV cache = {b(self.needed_bytes)} "
            f"on {self.device} in {self.dtype}; {free} available"
        )


def format_bytes(n: int) -> str:
    """Bytes as GiB (from a quarter GiB up) or MiB, as ``weights check`` prints sizes."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors: CUDA's free memory, or on CPU MemAvailable capped by a cgroup limit."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    avail = _meminfo("MemAvailable")
    limit = _cgroup_room()
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return limit
    return min(avail, limit) if limit is not None else avail


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> int | None:
    """Room left under a cgroup v2 memory limit (a container's), if there is one."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(int(limit) - int((base / "memory.current").read_text()), 0)
    except (OSError, ValueError):
        return None


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _llm_parts(llm_dir: str | os.PathLike[str]) -> tuple[int, int, Any]:
    """(embedding + head parameters, other LLM parameters, config) from ``config.json`` on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(Path(llm_dir).expanduser())
    with torch.device("meta"):
        llm = LlamaForCausalLM(config)
    total = _count(llm)
    edges = llm.model.embed_tokens.weight.numel()  # get_input_embeddings(), typed
    if not config.tie_word_embeddings:
        edges += llm.lm_head.weight.numel()  # get_output_embeddings()
    return edges, total - edges, config


def plan_memory(
    spec: VariantSpec,
    llm: str | os.PathLike[str],
    device: torch.device,
    dtype: torch.dtype,
    quantization: str = "none",
    context_tokens: int = 2000,
) -> MemoryPlan:
    """The memory ``load_minigpt4`` will use for these weights (``LoRA`` adapters, a few MB, not counted).

    As :func:`model.loader._place` lays it out: the ViT and LLM in ``dtype``; ``ln_vision``, the Q-Former
    (with its queries) and the projection in float32; int8 / nf4 store the LLM's linear layers in 1 / ½
    byte per parameter (the embeddings stay in ``dtype``).
    """
    from model.minigpt4 import build_qformer, build_vision_encoder

    with torch.device("meta"):
        vit = _count(build_vision_encoder(spec))
        q = spec.qformer
        qformer = _count(build_qformer(spec)) + q.num_query_token * q.hidden if q else 0
    edges, body, config = _llm_parts(llm)
    hidden = int(config.hidden_size)
    width = spec.vision.width
    per = _BYTES[dtype]
    name = str(dtype).removeprefix("torch.")
    body_bytes = {"int8": body, "nf4": body // 2}.get(quantization, body * per)
    parts = [
        PartEstimate("vision encoder", vit, name, vit * per),
        PartEstimate("ln_vision", 2 * width, "float32", 8 * width),
    ]
    if qformer:
        parts.append(PartEstimate("Q-Former", qformer, "float32", 4 * qformer))
    proj = spec.projection_in_features * hidden + hidden
    parts.append(PartEstimate("projection", proj, "float32", 4 * proj))
    llm_name = name if quantization == "none" else f"{quantization} + {name}"
    parts.append(PartEstimate("LLM", edges + body, llm_name, edges * per + body_bytes))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv = 2 * int(config.num_hidden_layers) * kv_heads * head_dim * (2 if quantization != "none" else per)
    return MemoryPlan(
        device=str(device),
        dtype=name,
        parts=tuple(parts),
        weights_bytes=sum(p.bytes for p in parts),
        kv_bytes=kv * context_tokens,
        available_bytes=available_memory(device),
    )


def auto_cpu_dtype(spec: VariantSpec, llm: str | os.PathLike[str], dev: torch.device) -> torch.dtype:
    """``dtype = "auto"`` on CPU: float32 (exact, as the reference's CPU path) unless it would not fit here.

    Then bfloat16 (half the memory, float32's range), said in the start log with the numbers.
    """
    try:
        plan = plan_memory(spec, llm, dev, torch.float32)
    except (OSError, ValueError):
        return torch.float32  # no readable config.json: the loader reports it
    if plan.fits:
        return torch.float32
    log.info("dtype auto: float32 would not fit (%s); loading in bfloat16", plan.summary())
    return torch.bfloat16


def plan_for_settings(kwargs: Mapping[str, Any], context_tokens: int = 2000) -> MemoryPlan:
    """The plan for ``load_minigpt4(**kwargs)`` (``[model]``'s loader keywords), resolving ``auto`` as it does."""
    from model.loader import resolve_precision

    spec = get_variant(kwargs["variant"]).with_dims(kwargs.get("vision"), kwargs.get("qformer_dims"))
    quantization = kwargs.get("quantization") or "none"
    dev, dtype = resolve_precision(kwargs.get("device", "cpu"), kwargs.get("dtype", "float32"), quantization)
    if kwargs.get("dtype") == "auto" and dev.type == "cpu":
        dtype = auto_cpu_dtype(spec, kwargs["llm"], dev)
    return plan_memory(spec, kwargs["llm"], dev, dtype, quantization, context_tokens)
