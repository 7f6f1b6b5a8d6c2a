"""``MiniGPT4Config``: the ``config.json`` of an exported MiniGPT-4 model folder (``model_type = "minigpt4"``).

Read by vLLM (through ``AutoConfig``, registered by :func:`model.vllm_plugin.register`) in the vLLM
environment and written by :mod:`model.vllm_plugin.export` in the bot's, so this module imports
transformers' config classes only (present in both the vLLM venv's transformers 5.19 and the bot's).
The sub-configs are transformers' own ``Blip2VisionConfig`` / ``Blip2QFormerConfig`` / ``LlamaConfig``
because vLLM's ``BlipVisionModel``, ``Blip2QFormerModel`` and ``LlamaForCausalLM`` read them.

:func:`expected_shapes` is the one list of tensor names and shapes an exported ``model.safetensors`` must
hold for a config; the export checks its output against it and the vLLM model loads exactly these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from transformers import Blip2QFormerConfig, Blip2VisionConfig, LlamaConfig, PretrainedConfig

__all__ = ["ARCHITECTURE", "MODEL_TYPE", "MiniGPT4Config", "expected_shapes"]

MODEL_TYPE = "minigpt4"
ARCHITECTURE = "MiniGPT4ForConditionalGeneration"


def _square(size: int | Sequence[int]) -> int:
    """An image or patch side: transformers allows ``(height, width)``, MiniGPT-4's ViT is square."""
    if isinstance(size, int):
        return size
    height, width = size
    if height != width:
        raise ValueError(f"MiniGPT-4's ViT takes square images and patches, not {height}×{width}")
    return int(height)


_Config = TypeVar("_Config", bound=PretrainedConfig)


def _sub(value: Mapping[str, Any] | _Config | None, cls: type[_Config]) -> _Config | None:
    if value is None or isinstance(value, PretrainedConfig):
        return value
    return cls(**{k: v for k, v in dict(value).items() if k != "model_type"})


class MiniGPT4Config(PretrainedConfig):
    """One MiniGPT-4 variant: EVA ViT (+ Q-Former) + projection + LLaMA, and the prompt-side facts.

    ``image_token_id`` is the LLM's vocabulary size: one id past the embedding table, so it can never be
    a text token; the exported tokenizer maps ``<ImageHere>`` to it.  ``num_image_tokens`` is how many
    LLM positions one picture takes (32 Q-Former queries, or patches / ``group_tokens``).
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        variant: str = "vicuna0",
        template: str = "vicuna0",
        vision_config: dict[str, Any] | Blip2VisionConfig | None = None,
        qformer_config: dict[str, Any] | Blip2QFormerConfig | None = None,
        text_config: dict[str, Any] | LlamaConfig | None = None,
        num_query_tokens: int = 0,
        group_tokens: int = 4,
        ln_vision_eps: float = 1e-5,
        num_image_tokens: int = 32,
        image_token_id: int = 32000,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("architectures", [ARCHITECTURE])
        super().__init__(**kwargs)
        self.variant = variant
        self.template = template
        vision = _sub(vision_config or {}, Blip2VisionConfig)
        assert vision is not None
        self.vision_config = vision
        self.qformer_config = _sub(qformer_config, Blip2QFormerConfig)
        text = _sub(text_config or {}, LlamaConfig)
        assert text is not None
        if not getattr(text, "architectures", None):
            text.architectures = ["LlamaForCausalLM"]
        self.text_config = text
        self.num_query_tokens = num_query_tokens
        self.group_tokens = group_tokens
        self.ln_vision_eps = ln_vision_eps
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id

    @property
    def has_qformer(self) -> bool:
        return self.qformer_config is not None

    @property
    def image_size(self) -> int:
        return _square(self.vision_config.image_size)

    @property
    def projection_in_features(self) -> int:
        if self.qformer_config is not None:
            return int(self.qformer_config.hidden_size)
        return int(self.vision_config.hidden_size) * self.group_tokens

    def to_dict(self) -> dict[str, Any]:
        """Nested configs as dicts (``qformer_config`` stays ``null`` for the no-Q-Former variants)."""
        out = super().to_dict()
        for key in ("vision_config", "qformer_config", "text_config"):
            value = getattr(self, key)
            out[key] = value.to_dict() if isinstance(value, PretrainedConfig) else value
        return out


def expected_shapes(config: MiniGPT4Config) -> dict[str, tuple[int, ...]]:
    """Every tensor an export must hold, by the names :class:`MiniGPT4ForConditionalGeneration` loads.

    Vision / Q-Former names are vLLM's (``BlipVisionModel``: fused ``qkv``; ``Blip2QFormerModel``); the
    LLM keeps Hugging Face names under ``language_model.`` because vLLM's ``LlamaForCausalLM.load_weights``
    fuses ``q/k/v_proj`` and ``gate/up_proj`` itself.
    """
    v, t = config.vision_config, config.text_config
    w, mlp, patch = int(v.hidden_size), int(v.intermediate_size), _square(v.patch_size)
    grid = _square(v.image_size) // patch
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, w),
        "vision_model.embeddings.position_embedding": (1, 1 + grid * grid, w),
        "vision_model.embeddings.patch_embedding.weight": (w, 3, patch, patch),
        "vision_model.embeddings.patch_embedding.bias": (w,),
        "ln_vision.weight": (w,),
        "ln_vision.bias": (w,),
    }
    for i in range(int(v.num_hidden_layers)):
        p = f"vision_model.encoder.layers.{i}."
        shapes |= {
            p + "layer_norm1.weight": (w,), p + "layer_norm1.bias": (w,),
            p + "layer_norm2.weight": (w,), p + "layer_norm2.bias": (w,),
            p + "self_attn.qkv.weight": (3 * w, w), p + "self_attn.qkv.bias": (3 * w,),
            p + "self_attn.projection.weight": (w, w), p + "self_attn.projection.bias": (w,),
            p + "mlp.fc1.weight": (mlp, w), p + "mlp.fc1.bias": (mlp,),
            p + "mlp.fc2.weight": (w, mlp), p + "mlp.fc2.bias": (w,),
        }  # fmt: skip
    q = config.qformer_config
    if q is not None:
        h, inter, enc = int(q.hidden_size), int(q.intermediate_size), int(q.encoder_hidden_size)
        shapes |= {"query_tokens": (1, config.num_query_tokens, h),
                   "qformer.layernorm.weight": (h,), "qformer.layernorm.bias": (h,)}  # fmt: skip
        for j in range(int(q.num_hidden_layers)):
            p = f"qformer.encoder.layer.{j}."
            blocks = [("attention", h)] + ([("crossattention", enc)] if j % q.cross_attention_frequency == 0 else [])
            for block, kv_in in blocks:
                a = f"{p}{block}."
                for name, fan_in in (("query", h), ("key", kv_in), ("value", kv_in)):
                    shapes |= {a + f"attention.{name}.weight": (h, fan_in), a + f"attention.{name}.bias": (h,)}
                shapes |= {a + "output.dense.weight": (h, h), a + "output.dense.bias": (h,),
                           a + "output.LayerNorm.weight": (h,), a + "output.LayerNorm.bias": (h,)}  # fmt: skip
            shapes |= {
                p + "intermediate_query.dense.weight": (inter, h), p + "intermediate_query.dense.bias": (inter,),
                p + "output_query.dense.weight": (h, inter), p + "output_query.dense.bias": (h,),
                p + "output_query.LayerNorm.weight": (h,), p + "output_query.LayerNorm.bias": (h,),
            }  # fmt: skip
    hidden, vocab, inter = int(t.hidden_size), int(t.vocab_size), int(t.intermediate_size)
    heads = int(t.num_attention_heads)
    head_dim = int(getattr(t, "head_dim", None) or hidden // heads)
    kv = int(getattr(t, "num_key_value_heads", None) or heads) * head_dim
    shapes |= {"llama_proj.weight": (hidden, config.projection_in_features), "llama_proj.bias": (hidden,),
               "language_model.model.embed_tokens.weight": (vocab, hidden),
               "language_model.model.norm.weight": (hidden,)}  # fmt: skip
    if not getattr(t, "tie_word_embeddings", False):
        shapes["language_model.lm_head.weight"] = (vocab, hidden)
    for i in range(int(t.num_hidden_layers)):
        p = f"language_model.model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        }  # fmt: skip
    return shapes


def register_config() -> None:
    """Register :class:`MiniGPT4Config` with ``AutoConfig`` (idempotent).

    vLLM needs it to read an exported folder; the bot needs it too wherever transformers looks a folder's
    config up by its ``model_type`` (``AutoTokenizer`` does, and otherwise warns that it loads ``minigpt4``
    as an untyped config).
    """
    from transformers import AutoConfig

    try:
        AutoConfig.register(MODEL_TYPE, MiniGPT4Config, exist_ok=True)
    except TypeError:  # a transformers without exist_ok
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if MODEL_TYPE not in CONFIG_MAPPING:
            AutoConfig.register(MODEL_TYPE, MiniGPT4Config)
