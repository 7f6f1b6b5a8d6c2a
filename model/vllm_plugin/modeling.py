"""MiniGPT-4 as a native vLLM model: ``MiniGPT4ForConditionalGeneration`` (all three variants).

Imported only inside the vLLM environment (through the lazy registration in
:func:`model.vllm_plugin.register`).  It is built from vLLM's own layers so vLLM's scheduler, encoder
cache and prefix cache serve it:

* the EVA ViT-g is vLLM's ``BlipVisionModel`` (fused ``qkv`` whose bias is ``cat(q, 0, v)``, exact GELU),
  built without its final norm: MiniGPT-4's ``ln_vision`` is a separate LayerNorm (eps 1e-5, not the ViT's 1e-6);
* the Q-Former (``vicuna0``) is vLLM's ``Blip2QFormerModel`` (query side only, as MiniGPT-4 uses it);
* the LLaMA is whatever vLLM registers for ``text_config.architectures`` (``init_vllm_registered_model``).

Data flow per picture (:meth:`MiniGPT4ForConditionalGeneration.embed_multimodal`), as
``model/minigpt4.py:MiniGPT4.encode_images_detailed``: pixels → ViT (model dtype) → ``ln_vision`` (fp32)
→ Q-Former (fp32) or "drop CLS, concatenate ``group_tokens`` neighbours" → ``llama_proj`` (fp32) → LLM dtype.
Keeping ``ln_vision``, the Q-Former, the queries and the projection in fp32 mirrors the reference on a GPU
(README "Precision"); on CPU everything is fp32 anyway.

Prompt contract (the bot's vLLM backend relies on it): the prompt is token ids — the reference's
``<ImageHere>`` segments tokenised separately (BOS on the first only) — joined by ONE ``image_token_id``
per picture.  The processor replaces each such id with ``num_image_tokens`` copies; vLLM then scatters
this model's per-picture embeddings over them.  ``image_token_id`` is the LLM's vocabulary size, so it
is masked to 0 before the embedding lookup (``configure_mm_token_handling``).  Pixels come from the
project's own :class:`model.image_processing.ImageProcessor`, bit for bit the reference's preprocessing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.model_executor.models.blip import BlipVisionModel
from vllm.model_executor.models.blip2 import Blip2QFormerModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors
from vllm.utils.torch_utils import set_default_torch_dtype

from model.conversation import IMAGE_PLACEHOLDER
from model.image_processing import ImageProcessor
from model.vllm_plugin.configuration import MiniGPT4Config, expected_shapes

__all__ = ["MiniGPT4ForConditionalGeneration"]


class MiniGPT4ProcessingInfo(BaseProcessingInfo):
    """What vLLM's multimodal machinery needs to know: limits, tokens per picture, picture size."""

    def get_hf_config(self) -> MiniGPT4Config:
        return self.ctx.get_hf_config(MiniGPT4Config)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}  # the reference takes any number of pictures per thread

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": set()}  # no HF processor: nothing to route

    def get_num_image_tokens(self) -> int:
        return int(self.get_hf_config().num_image_tokens)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}


class MiniGPT4DummyInputsBuilder(BaseDummyInputsBuilder[MiniGPT4ProcessingInfo]):
    """Profiling inputs: one ``<ImageHere>`` per picture, square pictures of the model's size."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> Mapping[str, Any]:
        size = self.info.get_hf_config().image_size
        images = self._get_dummy_images(
            width=size, height=size, num_images=mm_counts.get("image", 0), overrides=mm_options.get("image")
        )
        return {"image": images}


class MiniGPT4MultiModalProcessor(BaseMultiModalProcessor[MiniGPT4ProcessingInfo]):
    """Pixels by the project's preprocessing; each ``image_token_id`` becomes ``num_image_tokens`` slots."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = hf_data.get("images") or []
        if not isinstance(images, Sequence) or isinstance(images, Image.Image):
            images = [images]
        processor = ImageProcessor(self.info.get_hf_config().image_size)
        pixels = [processor(_as_pil(image)) for image in images]
        return BatchFeature({"pixel_values": torch.stack(pixels)} if pixels else {})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        image_id = int(config.image_token_id)
        return [
            PromptReplacement(
                modality="image", target=[image_id], replacement=[image_id] * int(config.num_image_tokens)
            )
        ]


def _as_pil(image: object) -> Image.Image:
    """vLLM hands PIL images on (``image_pil``, decoded ``image_url``); an ``H×W×3`` uint8 array is taken too."""
    if isinstance(image, Image.Image):
        return image
    import numpy as np

    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"MiniGPT-4 takes pictures as PIL images or H×W×3 uint8 arrays, got {type(image).__name__}")
    return Image.fromarray(array)


@MULTIMODAL_REGISTRY.register_processor(
    MiniGPT4MultiModalProcessor, info=MiniGPT4ProcessingInfo, dummy_inputs=MiniGPT4DummyInputsBuilder
)
class MiniGPT4ForConditionalGeneration(nn.Module, SupportsMultiModal):
    """EVA ViT-g (+ Q-Former) + ``llama_proj`` + LLaMA; loads exactly the tensors of an export."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER  # the exported chat template wraps it in <Img>…</Img>
        raise ValueError("MiniGPT-4 takes images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: MiniGPT4Config = vllm_config.model_config.hf_config
        self.config = config
        quant_config = vllm_config.quant_config
        v = config.vision_config
        # SupportsMultiModal's (vLLM is not in the .venv mypy runs in: nn.Module.__getattr__ answers for it)
        with self._mark_tower_model(vllm_config, "image"):  # type: ignore[operator]
            self.vision_model = BlipVisionModel(
                v, quant_config, require_post_norm=False, prefix=maybe_prefix(prefix, "vision_model")
            )
            with set_default_torch_dtype(torch.float32):  # fp32 as the reference keeps them (README "Precision")
                self.ln_vision = nn.LayerNorm(int(v.hidden_size), eps=float(config.ln_vision_eps))
                if config.qformer_config is not None:
                    q = config.qformer_config
                    self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, int(q.hidden_size)))
                    self.qformer = Blip2QFormerModel(
                        q, quant_config=None, cache_config=None, prefix=maybe_prefix(prefix, "qformer")
                    )
                self.llama_proj = nn.Linear(config.projection_in_features, int(config.text_config.hidden_size))
        # SupportsMultiModal's (vLLM is not in the .venv mypy runs in: nn.Module.__getattr__ answers for it)
        with self._mark_language_model(vllm_config):  # type: ignore[operator]
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config, prefix=maybe_prefix(prefix, "language_model")
            )
        # SupportsMultiModal's (vLLM is not in the .venv mypy runs in: nn.Module.__getattr__ answers for it)
        self.configure_mm_token_handling(  # type: ignore[operator]
            int(config.text_config.vocab_size), [int(config.image_token_id)]
        )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # ------------------------------------------------------------------ pictures

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` → ``[B, N, H]`` in the LLM's dtype (``MiniGPT4.encode_images_detailed``)."""
        vit_dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        vit_out = self.vision_model(pixels.to(vit_dtype))  # [B, 1+P, W]
        ln_out = self.ln_vision(vit_out.float())  # [B, 1+P, W] fp32
        if self.config.qformer_config is not None:
            queries = self.query_tokens.expand(ln_out.shape[0], -1, -1)
            features = self.qformer(query_embeds=queries, encoder_hidden_states=ln_out)  # [B, Q, Hq]
        else:
            patches = ln_out[:, 1:, :]  # drop CLS
            batch, count, width = patches.shape
            group = int(self.config.group_tokens)
            features = patches.reshape(batch, count // group, width * group)  # [B, P/g, g·W]
        tokens = self.llama_proj(features.float())
        llm_dtype = self.language_model.model.embed_tokens.weight.dtype
        return tokens.to(llm_dtype)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One ``Tensor[num_image_tokens, hidden]`` per picture, in prompt order."""
        pixels = kwargs.get("pixel_values")
        if pixels is None:
            return []
        if isinstance(pixels, (list, tuple)):
            pixels = torch.stack(list(pixels))
        assert isinstance(pixels, torch.Tensor)
        size = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"expected pixel_values [B, 3, {size}, {size}], got {list(pixels.shape)}")
        return tuple(self._encode(pixels).unbind(0))

    # ------------------------------------------------------------------ LLM

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load an export (``minigpt4-bot weights export``): exactly :func:`expected_shapes`, nothing else.

        vLLM itself refuses parameters left unloaded; this also refuses a file that holds other names or
        shapes than the export writes, naming them, instead of vLLM's bare "no module named …".
        """
        expected = expected_shapes(self.config)
        seen: set[str] = set()
        problems: list[str] = []

        def checked() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                seen.add(name)
                if name not in expected:
                    problems.append(f"unexpected tensor {name}")
                elif tuple(tensor.shape) != expected[name]:
                    problems.append(f"{name}: file has {tuple(tensor.shape)}, model needs {expected[name]}")
                else:
                    yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(checked())
        problems += [f"missing tensor {name}" for name in sorted(set(expected) - seen)]
        if problems:
            raise ValueError(
                "this MiniGPT-4 model folder does not fit its config.json (re-run minigpt4-bot weights export): "
                + "; ".join(problems[:8])
                + (f" … and {len(problems) - 8} more" if len(problems) > 8 else "")
            )
        return loaded
