"""What a loaded model is made of: the loader's file report and the weights' sizes.

``minigpt4-bot weights check`` prints both; the arithmetic on tensors lives here, next to the
model, so the command line only formats numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from model.checkpoints import CoverageReport
    from model.minigpt4 import MiniGPT4

__all__ = ["LoadReport", "PartReport", "WeightsReport", "describe_weights"]


@dataclass
class LoadReport:
    """What was loaded from where (set as ``MiniGPT4.load_report`` by :func:`model.load_minigpt4`)."""

    variant: str
    device: str
    dtype: str
    quantization: str
    files: list[CoverageReport] = field(default_factory=list)
    llm_ignored: list[str] = field(default_factory=list)
    lora_rank: int | None = None


@dataclass(frozen=True)
class PartReport:
    """One part of the model: its parameters, their (dominant) dtype and their bytes in memory."""

    name: str
    parameters: int
    dtype: str
    bytes: int


@dataclass(frozen=True)
class WeightsReport:
    """Sizes of a loaded model's parts, its weights in total, and the KV cache an answer needs.

    ``kv_bytes_per_token`` counts keys and values of every LLM layer in the LLM's compute dtype;
    ``kv_bytes_per_thread`` is that times ``context_tokens`` (one thread at the full context).
    """

    parts: tuple[PartReport, ...]
    weights_bytes: int
    kv_bytes_per_token: int
    context_tokens: int
    kv_bytes_per_thread: int

    def part(self, name: str) -> PartReport:
        """The part called ``name`` (``KeyError`` if the model has none)."""
        for part in self.parts:
            if part.name == name:
                return part
        raise KeyError(name)


def describe_weights(model: MiniGPT4, context_tokens: int) -> WeightsReport:
    """Parameter counts, dtypes and bytes per part, in data-flow order, plus the KV cache per token and thread.

    The parts are ``vision encoder``, ``ln_vision``, ``Q-Former`` (with its query tokens; Q-Former
    variants only), ``projection`` and ``LLM`` (with any LoRA adapters); together they hold every
    parameter of ``model``.
    """
    named: dict[str, list[torch.Tensor]] = {
        "vision encoder": list(model.visual_encoder.parameters()),
        "ln_vision": list(model.ln_vision.parameters()),
    }
    if model.qformer is not None:
        queries = [model.query_tokens] if model.query_tokens is not None else []
        named["Q-Former"] = [*queries, *model.qformer.parameters()]
    named["projection"] = list(model.llama_proj.parameters())
    named["LLM"] = list(model.llm.parameters())
    parts = tuple(_part(name, params) for name, params in named.items())
    per_token = kv_bytes_per_token(model)
    return WeightsReport(
        parts=parts,
        weights_bytes=sum(p.bytes for p in parts),
        kv_bytes_per_token=per_token,
        context_tokens=context_tokens,
        kv_bytes_per_thread=per_token * context_tokens,
    )


def kv_bytes_per_token(model: MiniGPT4) -> int:
    """Bytes of keys + values one token occupies across the LLM's layers (grouped-query attention aware)."""
    config = model.llm.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * model.llm_dtype.itemsize


def _part(name: str, params: Iterable[torch.Tensor]) -> PartReport:
    count = size = 0
    by_dtype: dict[torch.dtype, int] = {}
    for p in params:
        count += p.numel()
        size += p.numel() * p.element_size()
        by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.numel()
    dtype = max(by_dtype, key=by_dtype.__getitem__) if by_dtype else None
    return PartReport(name, count, str(dtype).removeprefix("torch.") if dtype else "-", size)
