"""The trained forward pass: what DDP wraps (frozen encoder → ``llama_proj`` → LLM → mean answer loss)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model.training.batch import TextBatch, assemble_embeddings

__all__ = ["LossModule", "text_tensors"]


class LossModule(nn.Module):
    """What DDP wraps: frozen encoder (no grad) → ``llama_proj`` → spliced embeddings → LLM → mean answer loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        m: Any = self.model
        out = m.encode_images_detailed(pixels)  # inference mode: ViT, ln_vision, Q-Former frozen
        frozen = out.qformer_out if out.qformer_out is not None else out.grouped
        features = frozen.clone()  # a normal tensor autograd may save
        tokens = m.llama_proj(features.to(m.llama_proj.weight.dtype))  # [B, N, H]
        batch = TextBatch(**tensors, prompt=None)
        embeds = assemble_embeddings(m.llm.get_input_embeddings(), batch, tokens)
        hidden = m.llm.model(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False)
        return windowed_loss(m.llm.lm_head, hidden.last_hidden_state, batch.labels)


def windowed_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over labelled positions, computing logits only where a label is predicted (same numbers, less memory)."""
    target = labels[:, 1:]
    predicting = (target != -100).any(dim=0).nonzero()
    if predicting.numel() == 0:
        return hidden.sum() * 0.0
    lo, hi = int(predicting.min()), int(predicting.max()) + 1
    logits = lm_head(hidden[:, lo:hi]).float()
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target[:, lo:hi].reshape(-1), ignore_index=-100
    )


def text_tensors(batch: TextBatch, device: torch.device) -> dict[str, torch.Tensor]:
    """The text side of a batch as the tensors :class:`LossModule` takes, on ``device``."""
    names = ("input_ids", "attention_mask", "labels", "visual_rows", "visual_cols", "visual_index")
    return {k: getattr(batch, k).to(device) for k in names}
