"""The ``[model]`` table of ``bot.toml`` and of ``train.toml``: which original weight files to load, and how.

One class for both files, so their keys, types, defaults and checks cannot drift apart: the bot's
configuration uses it as it is (``bot.core.config.ModelSettings``) and training narrows it
(:class:`model.training.settings.TrainModelSettings`).  It lives in ``model/`` because ``model/`` may
import nothing outside itself, and the keyword arguments it produces are :func:`model.load_minigpt4`'s.
Like ``model.engine.contract`` it imports no torch, so the bot core may import it
(``tests/test_layering.py``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ModelSettings"]


class ModelSettings(BaseModel):
    """``[model]``: which weights to load and how (paths to the original published files)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    variant: Literal["vicuna0", "llama2", "minigptv2"] = "vicuna0"
    llm: str = Field("", description="HF LLaMA/Vicuna directory; empty = demo weights")
    vit: str = Field("", description="LAVIS eva_vit_g.pth")
    qformer: str = Field("", description="BLIP-2 blip2_pretrained_flant5xxl.pth (vicuna0 only)")
    projection: str = Field("", description="stage-2 checkpoint (pretrained_minigpt4*.pth / MiniGPT-v2)")
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantization: Literal["none", "int8", "nf4"] = "none"
    vision: dict[str, float] | None = None
    qformer_dims: dict[str, float] | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("use auto, cpu, cuda or cuda:N")

    @property
    def uses_demo_weights(self) -> bool:
        """No real weights configured: the bot starts on tiny random demo weights."""
        return not (self.llm or self.vit or self.projection)

    def loader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.load_minigpt4`` (paths as given, already resolved)."""
        ints = {k: _size(k, v) for k, v in (self.vision or {}).items()}
        qints = {k: _size(k, v) for k, v in (self.qformer_dims or {}).items()}
        return dict(
            variant=self.variant,
            llm=self.llm,
            vit=self.vit,
            qformer=self.qformer or None,
            projection=self.projection,
            device=self.device,
            dtype=self.dtype,
            quantization=self.quantization,
            vision=ints or None,
            qformer_dims=qints or None,
        )


def _size(key: str, value: float) -> int | float:
    """TOML numbers of a size table: counts as ``int``; epsilons and ratios (``mlp_ratio = 4.3637``) stay floats."""
    if "eps" in key or not float(value).is_integer():
        return value
    return int(value)
