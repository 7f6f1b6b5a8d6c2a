"""The model a run trains: its device, the starting ``llama_proj`` of stage 1 from scratch, what is frozen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.training.checkpoint import save_checkpoint, trainable_named_parameters
from model.training.settings import TrainConfig

__all__ = ["freeze_all_but_trained", "training_device", "write_initial_projection"]


def training_device(config: TrainConfig) -> torch.device:
    """The device the ``[model]`` table resolves to (the loader's own rule), known before any weight is read."""
    from model.loader import resolve_precision

    kwargs = config.model.loader_kwargs()
    device, _ = resolve_precision(kwargs["device"], kwargs["dtype"], kwargs["quantization"])
    return torch.device(device)


def write_initial_projection(config: TrainConfig, path: Path) -> tuple[int, int]:
    """Stage 1 from scratch (no ``projection``): a fresh ``nn.Linear`` seeded with ``seed``, as the reference
    builds ``llama_proj`` before any checkpoint, written to ``path``; returns its (in, out) features.

    Raises ``ValueError`` naming the LLM's ``config.json`` when its ``hidden_size`` cannot be read."""
    from model.variants import get_variant

    kwargs = config.model.loader_kwargs()
    spec = get_variant(kwargs["variant"]).with_dims(kwargs["vision"], kwargs["qformer_dims"])
    try:
        llm_config = json.loads((Path(kwargs["llm"]) / "config.json").read_text(encoding="utf-8"))
        hidden = int(llm_config["hidden_size"])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read hidden_size from {kwargs['llm']}/config.json: {exc}") from exc
    generator_state = torch.get_rng_state()
    torch.manual_seed(config.train.seed)
    layer = nn.Linear(spec.projection_in_features, hidden)
    torch.set_rng_state(generator_state)
    state = {f"llama_proj.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
    save_checkpoint(path, {"model": state})
    return spec.projection_in_features, hidden


def freeze_all_but_trained(model: Any) -> tuple[list[tuple[str, nn.Parameter]], str]:
    """Everything frozen and in eval mode but ``llama_proj`` (+ LoRA, whose dropout trains as in the reference);
    returns the trained parameters and a one-line description of them for the log."""
    model.eval().requires_grad_(False)
    named = trainable_named_parameters(model)
    for _, param in named:
        if param.dtype != torch.float32:  # fp32 master weights (GradScaler, AdamW); the LLM stays fp16
            param.data = param.data.float()
        param.requires_grad_(True)
    for name, module in model.llm.named_modules():
        if "lora_dropout" in name:
            module.train()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for _, p in named}, "only llama_proj (and MiniGPT-v2's LoRA) may be trained"
    lora = [n for n, _ in named if ".lora_" in n]
    if model.spec.lora is not None:
        assert lora, "MiniGPT-v2 trains LoRA on q_proj/v_proj but the model has none"
    else:
        assert not lora
    count = sum(p.numel() for _, p in named)
    parts = ", ".join(f"{n} {tuple(p.shape)}" for n, p in named if ".lora_" not in n)
    if lora:
        parts += f", {len(lora)} LoRA tensors (r={model.load_report.lora_rank}) on q_proj/v_proj"
    return named, f"trainable: {parts} = {count:,} parameters (ViT, ln_vision, Q-Former, LLM frozen)"
