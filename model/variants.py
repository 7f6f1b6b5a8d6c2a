"""The three published MiniGPT-4 variants and the sizes of their frozen parts.

Reference: ``minigpt4/configs/models/minigpt4_vicuna0.yaml``, ``minigpt4_llama2.yaml``,
``minigpt_v2.yaml``, ``minigpt4/models/eva_vit.py:create_eva_vit_g`` and BLIP-2's
``bert-base-uncased`` Q-Former.  Real sizes are the defaults; tests and demo weights
override them with the same keys as ``shared/parity/config.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from model.conversation import TEMPLATES, ConversationTemplate

log = logging.getLogger(__name__)

__all__ = [
    "VARIANTS",
    "LoraSpec",
    "QFormerDims",
    "VariantName",
    "VariantSpec",
    "VisionDims",
    "get_variant",
]

VariantName = Literal["vicuna0", "llama2", "minigptv2"]


@dataclass(frozen=True)
class VisionDims:
    """EVA-CLIP ViT-g/14 with the last of its 40 blocks removed (LAVIS ``create_eva_vit_g``)."""

    img_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    heads: int = 16
    mlp_hidden: int = 6144  # int(1408 * 4.3637)
    layer_norm_eps: float = 1e-6
    ln_vision_eps: float = 1e-5  # nn.LayerNorm default; ln_vision is not the ViT's own norm

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class QFormerDims:
    """BLIP-2's Q-Former: ``bert-base-uncased`` with cross-attention every 2nd layer."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    cross_attention_freq: int = 2
    num_query_token: int = 32
    encoder_width: int = 1408
    layer_norm_eps: float = 1e-12


@dataclass(frozen=True)
class LoraSpec:
    """MiniGPT-v2's LoRA on the LLM (``minigpt_v2.py``: r=64, alpha=16, dropout 0.05, q/v)."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class VariantSpec:
    """Everything that differs between the published variants."""

    name: VariantName
    has_qformer: bool
    template: ConversationTemplate
    vision: VisionDims
    qformer: QFormerDims | None
    lora: LoraSpec | None = None
    group_tokens: int = 4  # no-Q-Former variants concatenate this many patch tokens
    stop_strings: tuple[str, ...] = ()  # text-level stops used by the chat product

    @property
    def projection_in_features(self) -> int:
        if self.has_qformer:
            assert self.qformer is not None
            return self.qformer.hidden
        return self.vision.width * self.group_tokens

    @property
    def num_visual_tokens(self) -> int:
        if self.has_qformer:
            assert self.qformer is not None
            return self.qformer.num_query_token
        return self.vision.num_patches // self.group_tokens

    def with_dims(
        self, vision: Mapping[str, Any] | None = None, qformer_dims: Mapping[str, Any] | None = None
    ) -> VariantSpec:
        """Return a copy with some ViT / Q-Former sizes overridden (tiny test models)."""
        spec = self
        if vision:
            spec = replace(spec, vision=_override(spec.vision, vision, "vision"))
        if qformer_dims and not spec.has_qformer:
            log.warning("variant %r has no Q-Former: ignoring the Q-Former sizes given", spec.name)
        elif qformer_dims:
            assert spec.qformer is not None
            spec = replace(spec, qformer=_override(spec.qformer, qformer_dims, "qformer_dims"))
        if spec.vision.img_size % spec.vision.patch_size:
            raise ValueError(
                f"vision.img_size {spec.vision.img_size} is not a multiple of patch_size {spec.vision.patch_size}"
            )
        if not spec.has_qformer and spec.vision.num_patches % spec.group_tokens:
            raise ValueError(
                f"{spec.vision.num_patches} patches cannot be grouped by {spec.group_tokens} "
                f"(variant {spec.name!r}); choose img_size/patch_size so the patch count divides"
            )
        return spec


# Keys that describe a size the other keys already fix (as in shared/parity/config.json): checked, not set.
_DERIVED: dict[str, Any] = {
    "mlp_ratio": lambda d, v: int(d.width * v) == d.mlp_hidden,
    "num_patches": lambda d, v: d.num_patches == v,
    "tokens_with_cls": lambda d, v: d.num_patches + 1 == v,
    "cross_attention_layers": lambda d, v: list(v) == list(range(0, d.layers, d.cross_attention_freq)),
    # descriptive entries of the parity config: the architecture is fixed (exact GELU, q/v bias only)
    "gelu": lambda d, v: "erf" in str(v) or str(v) == "gelu",
    "hidden_act": lambda d, v: "erf" in str(v) or str(v) == "gelu",
    "qkv_bias": lambda d, v: True,
    "checkpoint_dtype": lambda d, v: True,
    "bert_config_overrides": lambda d, v: True,
}


def _override(dims: Any, values: Mapping[str, Any], table: str) -> Any:
    known = {f.name for f in fields(dims)}
    unknown = sorted(set(values) - known - set(_DERIVED))
    if unknown:
        raise ValueError(f"unknown key(s) in [{table}]: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    settable = {k: v for k, v in values.items() if k in known}
    if "mlp_ratio" in values and "mlp_hidden" not in values and "width" in values:
        settable["mlp_hidden"] = int(float(settable["width"]) * float(values["mlp_ratio"]))  # EVA's formula
    cast = {k: (float(v) if "eps" in k else int(v)) for k, v in settable.items()}
    result = replace(dims, **cast)
    for key in sorted(set(values) & set(_DERIVED)):
        try:
            consistent = _DERIVED[key](result, values[key])
        except (AttributeError, TypeError, ValueError):
            consistent = False
        if not consistent:
            raise ValueError(f"[{table}] {key} = {values[key]!r} does not agree with the other sizes given")
    return result


VARIANTS: dict[str, VariantSpec] = {
    "vicuna0": VariantSpec(
        name="vicuna0",
        has_qformer=True,
        template=TEMPLATES["vicuna0"],
        vision=VisionDims(),
        qformer=QFormerDims(),
        stop_strings=("###",),
    ),
    "llama2": VariantSpec(
        name="llama2", has_qformer=False, template=TEMPLATES["llama2"], vision=VisionDims(), qformer=None
    ),
    "minigptv2": VariantSpec(
        name="minigptv2",
        has_qformer=False,
        template=TEMPLATES["minigptv2"],
        vision=VisionDims(img_size=448),
        qformer=None,
        lora=LoraSpec(),
    ),
}


def get_variant(name: str) -> VariantSpec:
    """Look a variant up by name with an error that lists the valid names."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model variant {name!r}; choose one of {', '.join(VARIANTS)}") from None
