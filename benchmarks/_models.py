"""Random MiniGPT-4 models for benchmarks: built in memory on the target device, no files, no downloads.

``small`` keeps every structural feature at CPU-friendly sizes; ``7b`` is Vicuna-7B's real
shape (ViT-g, BERT-base Q-Former, LLaMA-7B) in fp16, meant for a GPU.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TypedDict

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from model.demo_weights import _train_tokenizer
from model.minigpt4 import MiniGPT4
from model.variants import QFormerDims, VisionDims, get_variant


class LlmSizes(TypedDict):
    """The LLaMA config's sizes."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int


class Shape(TypedDict):
    """One benchmark size: the ViT, the Q-Former and the LLaMA config's sizes."""

    vision: VisionDims
    qformer: QFormerDims
    llm: LlmSizes


SHAPES: dict[str, Shape] = {
    "small": dict(
        vision=VisionDims(img_size=224, patch_size=14, width=192, depth=4, heads=4, mlp_hidden=768),
        qformer=QFormerDims(hidden=128, layers=2, heads=4, intermediate=256, num_query_token=32, encoder_width=192),
        llm=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
    ),
    "7b": dict(
        vision=VisionDims(),
        qformer=QFormerDims(),
        llm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    ),
}


def random_minigpt4(shape: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> MiniGPT4:
    """A randomly initialised MiniGPT-4 (Vicuna v0 layout) of the given shape on ``device``."""
    torch.manual_seed(seed)
    sizes = SHAPES[shape]
    spec = replace(get_variant("vicuna0"), vision=sizes["vision"], qformer=sizes["qformer"])
    with tempfile.TemporaryDirectory() as tmp:
        _train_tokenizer(Path(tmp), 512)
        tokenizer = AutoTokenizer.from_pretrained(tmp, legacy=True)
        spm_file = str(Path(tmp) / "tokenizer.model")
        config = LlamaConfig(
            vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
            **sizes["llm"],
        )  # fmt: skip
        with torch.device(device):
            # transformers' @wraps(nn.Module.to) hides `self` from mypy (typeshed's _Wrapped is no descriptor)
            llm = LlamaForCausalLM(config).to(dtype)  # type: ignore[arg-type]
        model = MiniGPT4(spec, llm.eval(), tokenizer, config.hidden_size, spm_file)
    assert model.qformer is not None  # vicuna0 has one
    for module in (model.visual_encoder, model.llama_proj, model.qformer):
        module.to_empty(device=device)
        for name, param in module.named_parameters():
            with torch.no_grad():
                if "norm" in name and name.endswith("weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0, 0.02)
    model.query_tokens = torch.nn.Parameter(
        torch.randn(1, sizes["qformer"].num_query_token, sizes["qformer"].hidden) * 0.02
    )
    model.query_tokens.data = model.query_tokens.data.to(device)
    model.ln_vision.to(device)
    # transformers' @wraps(nn.Module.to) hides `self` from mypy (typeshed's _Wrapped is no descriptor)
    model.visual_encoder.to(dtype)  # type: ignore[arg-type]
    return model.eval().requires_grad_(False)
