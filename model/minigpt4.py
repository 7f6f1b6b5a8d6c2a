"""MiniGPT-4: a frozen EVA ViT-g (+ BLIP-2 Q-Former) and a frozen LLaMA joined by one linear layer.

Reference: ``minigpt4/models/minigpt4.py`` (``encode_img``), ``minigpt_v2.py`` and
``minigpt_base.py`` (``get_context_emb``).  Built from transformers' ``Blip2VisionModel``,
``Blip2QFormerModel`` and ``LlamaForCausalLM``; weights come from the original files
through :mod:`model.checkpoints` (see :func:`model.loader.load_minigpt4`).

Data flow for one image (real Vicuna-7B shapes)::

    pixels [B, 3, 224, 224]
      → visual_encoder (39 EVA blocks, no final norm)      [B, 257, 1408]
      → ln_vision (LayerNorm eps 1e-5, computed in fp32)   [B, 257, 1408]
      Q-Former variant:  → qformer(query_tokens ⨯ image)   [B, 32, 768]
      no-Q-Former:       drop CLS, concat 4 patch tokens   [B, 64, 5632]
      → llama_proj                                         [B, 32 | 64 | 256, 4096]

The prompt is split at ``<ImageHere>``; each text segment is tokenised on its own (BOS on
the first only), embedded, and the image tokens are spliced between them
(:meth:`MiniGPT4.context_embeddings`); :meth:`MiniGPT4.forward` runs the LLM over such
embeddings.  Generating (sampling loops, beam search, chat sessions) lives in
:mod:`model.generate` and :mod:`model.engine`, as transformers keeps it out of its model classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    LlamaForCausalLM,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from model.conversation import IMAGE_PLACEHOLDER, build_prompt
from model.engine.contract import ChatTurn
from model.image_processing import ImageProcessor
from model.text import TextCodec
from model.variants import VariantSpec

if TYPE_CHECKING:  # model.report describes this model (it imports it): only the type, for load_report
    from model.report import LoadReport

__all__ = ["MiniGPT4", "VisionOutputs", "build_qformer", "build_vision_encoder"]


def build_vision_encoder(spec: VariantSpec) -> Blip2VisionModel:
    """EVA ViT-g as ``Blip2VisionModel`` without its final norm (``ln_vision`` is separate)."""
    d = spec.vision
    config = Blip2VisionConfig(
        hidden_size=d.width,
        intermediate_size=d.mlp_hidden,
        num_hidden_layers=d.depth,
        num_attention_heads=d.heads,
        image_size=d.img_size,
        patch_size=d.patch_size,
        hidden_act="gelu",
        layer_norm_eps=d.layer_norm_eps,
        qkv_bias=True,
    )
    encoder = Blip2VisionModel(config)
    # transformers types the attribute as LayerNorm; MiniGPT-4's ViT has no final norm
    encoder.post_layernorm = nn.Identity()  # type: ignore[assignment]
    return encoder


def build_qformer(spec: VariantSpec) -> Blip2QFormerModel:
    """The Q-Former without BERT's text side (``use_qformer_text_input=False``), as MiniGPT-4 keeps it."""
    q = spec.qformer
    assert q is not None
    config = Blip2QFormerConfig(
        hidden_size=q.hidden,
        num_hidden_layers=q.layers,
        num_attention_heads=q.heads,
        intermediate_size=q.intermediate,
        hidden_act="gelu",
        layer_norm_eps=q.layer_norm_eps,
        cross_attention_frequency=q.cross_attention_freq,
        encoder_hidden_size=q.encoder_width,
        use_qformer_text_input=False,
    )
    return Blip2QFormerModel(config)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (the reference's ``base_model.LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


@dataclass
class VisionOutputs:
    """Every intermediate of :meth:`MiniGPT4.encode_images_detailed` (for parity checks and debugging)."""

    vit_out: torch.Tensor  # [B, 1+P, W]
    ln_vision_out: torch.Tensor  # [B, 1+P, W]
    qformer_out: torch.Tensor | None  # [B, Q, Hq]      (Q-Former variant)
    grouped: torch.Tensor | None  # [B, P/4, 4W]       (no-Q-Former variants)
    visual_tokens: torch.Tensor  # [B, N, H]


class MiniGPT4(nn.Module):
    """The assembled model; build it with :func:`model.load_minigpt4`.

    ``load_report`` says what the loader read from which file (``None`` for a model assembled by hand).
    """

    load_report: LoadReport | None

    def __init__(
        self, spec: VariantSpec, llm: LlamaForCausalLM, tokenizer: Any, llm_hidden: int, spm_file: str | None = None
    ) -> None:
        super().__init__()
        self.text = TextCodec(tokenizer, spm_file)
        self.spec = spec
        self.llm = llm
        self.tokenizer = tokenizer
        self.image_processor = ImageProcessor(spec.vision.img_size)
        with torch.device("meta"):
            self.visual_encoder = build_vision_encoder(spec)
            self.llama_proj = nn.Linear(spec.projection_in_features, llm_hidden)
            if spec.has_qformer:
                assert spec.qformer is not None
                self.qformer: Blip2QFormerModel | None = build_qformer(spec)
                self.query_tokens: nn.Parameter | None = nn.Parameter(
                    torch.empty(1, spec.qformer.num_query_token, spec.qformer.hidden)
                )
            else:
                self.qformer = None
                self.query_tokens = None
        # Default init (weight 1, bias 0): the no-Q-Former variants never load it.
        self.ln_vision = FP32LayerNorm(spec.vision.width, eps=spec.vision.ln_vision_eps)
        self.bos_id, self.eos_id = self.text.bos_id, self.text.eos_id
        self.load_report = None

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    @property
    def vision_dtype(self) -> torch.dtype:
        return self.visual_encoder.embeddings.patch_embedding.weight.dtype

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The LLM's input embedding table (what ``get_input_embeddings()`` returns, typed as the table it is)."""
        return self.llm.model.embed_tokens

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.llama_proj.out_features

    # ------------------------------------------------------------------ images

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image → ``Tensor[3, S, S]`` exactly as ``Blip2ImageEvalProcessor``."""
        return self.image_processor(image)

    @torch.inference_mode()
    def encode_images_detailed(self, pixels: torch.Tensor) -> VisionOutputs:
        """``Tensor[B, 3, S, S]`` → all intermediates of the visual path (see module docstring)."""
        size = self.spec.vision.img_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"expected pixels of shape [B, 3, {size}, {size}], got {list(pixels.shape)}")
        pixels = pixels.to(self.device, self.vision_dtype)
        vit_out = self.visual_encoder(pixel_values=pixels).last_hidden_state  # [B, 1+P, W]
        ln_out = self.ln_vision(vit_out.float())  # [B, 1+P, W] fp32
        qformer_out = grouped = None
        if self.qformer is not None:
            assert self.query_tokens is not None
            queries = self.query_tokens.expand(ln_out.shape[0], -1, -1)  # [B, Q, Hq]
            mask = torch.ones(ln_out.shape[:2], dtype=torch.long, device=ln_out.device)
            qformer_out = self.qformer(
                query_embeds=queries.to(self.qformer.layernorm.weight.dtype),
                encoder_hidden_states=ln_out,
                encoder_attention_mask=mask,
            ).last_hidden_state  # [B, Q, Hq]
            features = qformer_out
        else:
            patches = ln_out[:, 1:, :]  # drop CLS → [B, P, W]
            batch, count, width = patches.shape
            group = self.spec.group_tokens
            grouped = patches.reshape(batch, count // group, width * group)  # [B, P/4, 4W]
            features = grouped
        tokens = self.llama_proj(features.to(self.llama_proj.weight.dtype))  # [B, N, H]
        return VisionOutputs(vit_out, ln_out, qformer_out, grouped, tokens.to(self.llm_dtype))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``Tensor[B, 3, S, S]`` → projected visual tokens ``Tensor[B, N, H]`` in the LLM's dtype."""
        return self.encode_images_detailed(pixels).visual_tokens

    def encode_pil(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Convenience: PIL images → one ``Tensor[N, H]`` per image."""
        if not images:
            return []
        pixels = torch.stack([self.preprocess(im) for im in images])
        return list(self.encode_images(pixels).unbind(0))

    # ------------------------------------------------------------------ text

    def build_prompt(self, turns: Sequence[ChatTurn | Mapping[str, Any]]) -> str:
        """Turns → the variant's prompt, byte-exact with the reference ``Conversation``."""
        return build_prompt(self.spec.template, turns)

    def segment_token_ids(self, prompt: str) -> list[list[int]]:
        """Split at ``<ImageHere>`` and tokenise each segment separately, BOS on the first only."""
        return self.text.segment_token_ids(prompt)

    @torch.inference_mode()
    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        """Token ids → ``Tensor[T, H]`` with the LLM's input embedding table."""
        table = self.embed_tokens
        return table(torch.tensor(list(ids), dtype=torch.long, device=table.weight.device))

    @torch.inference_mode()
    def context_embeddings(self, prompt: str, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """``cat([seg0, img0, seg1, img1, …, segN])`` → ``Tensor[L, H]`` (reference ``get_context_emb``)."""
        segments = self.segment_token_ids(prompt)
        if len(segments) != len(images) + 1:
            raise ValueError(
                f"the prompt has {len(segments) - 1} {IMAGE_PLACEHOLDER} placeholder(s) "
                f"but {len(images)} image embedding(s) were given"
            )
        parts: list[torch.Tensor] = []
        for i, ids in enumerate(segments):
            parts.append(self.embed_ids(ids))
            if i < len(images):
                image = images[i]
                if image.dim() == 3 and image.shape[0] == 1:
                    image = image[0]
                if image.dim() != 2 or image.shape[-1] != self.hidden_size:
                    raise ValueError(
                        f"image embedding {i} has shape {list(image.shape)}; expected [N, {self.hidden_size}]"
                    )
                parts.append(image.to(parts[0].device, parts[0].dtype))
        return torch.cat(parts, dim=0)

    # ------------------------------------------------------------------ tokens ↔ text

    def decode_text(self, ids: Sequence[int]) -> str:
        """Token ids → text without special tokens, as the reference's slow tokenizer decodes (:class:`TextCodec`)."""
        return self.text.decode(ids)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        inputs_embeds: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutputWithPast:
        """One LLM pass: ``Tensor[B, L, H]`` embeddings (or ``input_ids [B, L]``) → logits ``[B, L', V]``.

        Pictures enter through the embeddings (:meth:`context_embeddings`, one row per thread); the
        generation loops in :mod:`model.generate` and the engine call this.  ``cache`` (a transformers
        ``Cache``) is extended in place; ``use_cache`` defaults to whether a cache is given, and
        ``logits_to_keep=n`` computes the last ``n`` positions' logits only (0: all).
        """
        if (inputs_embeds is None) == (input_ids is None):
            raise ValueError("give exactly one of inputs_embeds and input_ids")
        return self.llm(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None if use_cache is None else use_cache,
            logits_to_keep=logits_to_keep,
        )
