"""The engine's request type and the per-sequence state it tracks.

The events a request streams and the errors it raises are the torch-free contract in
:mod:`model.engine.contract`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from model.engine.contract import ChatTurn, FinishReason
from model.sampling import GenerationOptions, IncrementalDetokenizer, RowSampler

__all__ = ["EndReason", "EngineRequest", "FinishReason", "SeqState"]  # FinishReason: the contract's, beside EndReason

# how a sequence ended: a final event's finish reason, or "error" (its stream raised instead)
EndReason = FinishReason | Literal["error"]

ImageInput = bytes | Image.Image


@dataclass
class EngineRequest:
    """One answer to generate.

    Give either ``turns`` (the whole thread, rendered with the model's template) or a ready
    ``prompt`` with ``<ImageHere>`` markers; ``images`` are the thread's pictures in order
    (raw bytes, decoded on the engine's worker).  ``conversation_id`` keys the KV prefix
    kept for follow-ups; ``user`` is the fairness key; ``deadline_s`` bounds the whole request.
    """

    turns: Sequence[ChatTurn | Mapping[str, Any]] | None = None
    prompt: str | None = None
    images: Sequence[ImageInput] = ()
    options: GenerationOptions | None = None
    conversation_id: str | None = None
    user: str = "anonymous"
    deadline_s: float | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class SeqState:
    """Engine-internal state of one request, shared by the engine thread and the worker."""

    request: EngineRequest
    options: GenerationOptions
    prompt: str
    segments: list[list[int]]
    prompt_tokens: int
    submitted_at: float
    deadline: float | None
    image_keys: list[str] = field(default_factory=list)  # content hashes, computed on the worker
    context: torch.Tensor | None = None
    items: list[Any] = field(default_factory=list)
    sampler: RowSampler | None = None
    detok: IncrementalDetokenizer | None = None
    generated: list[int] = field(default_factory=list)
    reused_prefix_tokens: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    finish_reason: EndReason | None = None

    @property
    def seq_id(self) -> str:
        return self.request.request_id
