"""Training checkpoints in the reference's layout (``runner_base._save_checkpoint``), plus what resuming needs.

``checkpoint_<step>.pth`` / ``checkpoint_last.pth``::

    {"model": {"llama_proj.weight", "llama_proj.bias",
               ["llama_model.base_model.model.model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}.weight"]},
     "optimizer": AdamW state dict (the reference's two groups),
     "config": {"model": …, "run": …, "datasets": …},
     "scaler": GradScaler state or None, "epoch": int, "step": int,
     "resume": {"world_size", "ranks": [{"position", "torch_rng", "cuda_rng", "prompt_rng"}, …]}}

Only the trainable parameters are saved (as the reference does), in float32, under the names the reference and
:func:`model.loader.load_minigpt4` read (LoRA in peft 0.2.0 naming).  Everything in the file is plain
tensors / numbers / strings, so ``torch.load(weights_only=True)`` reads it.  Files are written to a temporary
name and renamed, so a crash never leaves a half-written ``checkpoint_last.pth``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LAST",
    "read_checkpoint",
    "reference_lora_name",
    "save_checkpoint",
    "trainable_named_parameters",
    "trainable_state",
]

LAST = "checkpoint_last.pth"
_LORA_PREFIX = "llama_model.base_model.model."


def reference_lora_name(llm_key: str) -> str:
    """``model.layers.0.self_attn.q_proj.lora_A.default.weight`` → the reference's (peft 0.2.0) checkpoint key."""
    return _LORA_PREFIX + llm_key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """What MiniGPT-4 trains, under the reference's names, in its module order: the LLM's LoRA, then ``llama_proj``."""
    named = [(reference_lora_name(k), p) for k, p in model.llm.named_parameters() if ".lora_" in k]  # type: ignore[union-attr]
    named += [(f"llama_proj.{k}", p) for k, p in model.llama_proj.named_parameters()]  # type: ignore[union-attr]
    return named


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``"model"`` entry: every trained tensor, float32, on the CPU."""
    return {name: p.detach().to("cpu", torch.float32).clone() for name, p in trainable_named_parameters(model)}


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True``; a clear error when it is not one."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read the checkpoint {path}: {exc}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict) or "optimizer" not in obj:
        raise ValueError(f"{path} is not a training checkpoint (no 'model' / 'optimizer' entries)")
    return obj
