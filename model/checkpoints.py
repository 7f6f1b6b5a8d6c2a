"""Readers and key maps for the original MiniGPT-4 checkpoint layouts, with coverage checks.

The reference loads every file with ``strict=False``, so a missing or mis-shaped tensor
silently stays random.  Here each file is mapped onto the transformers module that
replaces the reference module, and every parameter must be covered with the right
shape; what the reference deliberately ignores (``t5_proj.*``, optimizer state,
``position_ids``, the unused 40th ViT block…) is dropped by name.

Layouts (real shapes in ``shared/reference/minigpt4.md`` §2):

* LAVIS ``eva_vit_g.pth`` — plain state dict of the EVA ViT (``blocks.i.attn.q_bias`` …).
* BLIP-2 ``blip2_pretrained_flant5xxl.pth`` — ``{"model": {query_tokens, ln_vision.*, Qformer.bert.*, t5_proj.*}}``.
* stage-2 ``pretrained_minigpt4*.pth`` / MiniGPT-v2 checkpoint — ``{"model": {llama_proj.*,
  [llama_model.base_model.model.….lora_{A,B}.weight]}, "optimizer", "config", …}``.

The key maps follow transformers' ``convert_blip_2_original_to_pytorch.py``.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "CoverageReport",
    "convert_blip2_qformer",
    "convert_eva_vit",
    "convert_projection",
    "interpolate_pos_embed",
    "iter_tensors",
    "load_checked",
    "read_state_dict",
    "to_targets",
]


class CheckpointError(RuntimeError):
    """A weights file is missing, unreadable, or does not fit the model; the text says what to do."""


@dataclass
class CoverageReport:
    """What one file contributed to one module."""

    file: str
    role: str
    loaded: int = 0
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.loaded} tensors"]
        if self.ignored:
            parts.append(f"{len(self.ignored)} ignored as the reference does")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (not used)")
        return ", ".join(parts)


def read_state_dict(path: str | os.PathLike[str], role: str, wrapper_key: str | None = None) -> dict:
    """Read a ``.pth``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors`` file.

    ``wrapper_key`` unwraps LAVIS-style ``{"model": state_dict, "optimizer": …}`` files;
    a plain state dict is accepted as well.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{role} weights not found: {p} (check the [model] section of bot.toml)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p))
        else:
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
                obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"could not read {role} weights from {p}: {exc}. The file may be truncated or not a "
            "PyTorch checkpoint (only plain tensors are accepted: torch.load(weights_only=True))."
        ) from exc
    if wrapper_key and isinstance(obj, Mapping) and wrapper_key in obj:
        obj = obj[wrapper_key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p} does not hold a state dict of tensors ({role})")
    return dict(obj)


def iter_tensors(path: str | os.PathLike[str], role: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one weights file, one at a time, so a loader never holds the file twice.

    ``.safetensors`` is opened anew for each tensor: a mapping lives only while its one tensor is
    read (file pages already read count in the process's resident memory while mapped).  A ``.bin`` /
    ``.pth`` is memory-mapped once (``torch.load(mmap=True)``) and handed out tensor by tensor, each
    dropped from the dict as it goes; its mapping ends with the last one.
    """
    p = Path(path).expanduser()
    if p.suffix != ".safetensors":
        state = read_state_dict(p, role)
        for key in list(state):
            yield key, state.pop(key)
        return
    for key in _safetensors_call(p, role, lambda f: list(f.keys())):
        tensor = _safetensors_call(p, role, operator.methodcaller("get_tensor", key))
        yield key, tensor
        del tensor


def _safetensors_call(path: Path, role: str, call: Callable[[Any], Any]) -> Any:
    """``call(handle)`` on a freshly opened safetensors file, its errors as :class:`CheckpointError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return call(handle)
    except Exception as exc:  # SafetensorError (truncated, bad header) derives from Exception only
        raise CheckpointError(f"could not read {role} weights from {path}: {exc}") from exc


def to_targets(
    state: MutableMapping[str, torch.Tensor], device: torch.device, dtype: Callable[[str], torch.dtype]
) -> dict[str, torch.Tensor]:
    """Move and convert ``state`` tensor by tensor into a new dict, emptying ``state`` as it goes.

    ``dtype(key)`` names each floating tensor's dtype.  Each source tensor is released as soon as its
    converted copy exists, so a part is never held twice in memory (the whole-module ``.to()`` used to
    keep the file's tensors alive until the end).
    """
    out: dict[str, torch.Tensor] = {}
    for key in list(state):
        tensor = state.pop(key)
        out[key] = tensor.to(device, dtype(key)) if tensor.is_floating_point() else tensor.to(device)
        del tensor
    return out


# --------------------------------------------------------------------------- EVA ViT-g


_EVA_IGNORED = re.compile(r"^(norm|fc_norm|head|lm_head|rel_pos_bias)\.")
_EVA_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_EVA_BLOCK_MAP = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.proj.weight": "self_attn.projection.weight",
    "attn.proj.bias": "self_attn.projection.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize ``[1, 1 + g*g, C]`` position embeddings to ``grid``×``grid`` (LAVIS ``interpolate_pos_embed``).

    Done once at load time in float32 with bicubic, ``align_corners=False``, exactly as the
    reference does for MiniGPT-v2 (16×16 → 32×32), instead of at every forward pass.
    """
    pos = pos_embed.float()
    width = pos.shape[-1]
    old = round((pos.shape[-2] - 1) ** 0.5)
    if old * old != pos.shape[-2] - 1:
        raise CheckpointError(f"pos_embed has {pos.shape[-2]} positions, not 1 + a square grid")
    if old == grid:
        return pos
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    patch_pos = patch_pos.reshape(-1, old, old, width).permute(0, 3, 1, 2)  # [1, C, g, g]
    patch_pos = nn.functional.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).flatten(1, 2)  # [1, grid*grid, C]
    return torch.cat((cls_pos, patch_pos), dim=1)


def convert_eva_vit(sd: Mapping[str, torch.Tensor], depth: int, grid: int, file: str) -> tuple[dict, CoverageReport]:
    """Map LAVIS ``eva_vit_g.pth`` keys onto ``Blip2VisionModel`` keys.

    ``q_bias``/``v_bias`` become HF's fused ``qkv.bias = cat(q, 0, v)`` (EVA has no k bias);
    blocks at index ≥ ``depth`` are dropped, as the reference builds only 39 of 40.
    """
    report = CoverageReport(file=file, role="vision encoder")
    out: dict[str, torch.Tensor] = {}
    biases: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key == "cls_token":
            out["embeddings.class_embedding"] = value
        elif key == "pos_embed":
            out["embeddings.position_embedding"] = interpolate_pos_embed(value, grid)
        elif key.startswith("patch_embed.proj."):
            out["embeddings.patch_embedding." + key.rsplit(".", 1)[1]] = value
        elif m := _EVA_BLOCK.match(key):
            index, rest = int(m.group(1)), m.group(2)
            if index >= depth:
                report.ignored.append(key)
            elif rest in ("attn.q_bias", "attn.v_bias"):
                biases.setdefault(index, {})[rest[5]] = value
            elif rest in _EVA_BLOCK_MAP:
                out[f"encoder.layers.{index}.{_EVA_BLOCK_MAP[rest]}"] = value
            else:
                report.unexpected.append(key)
        elif _EVA_IGNORED.match(key):
            report.ignored.append(key)
        else:
            report.unexpected.append(key)
    for index, qv in biases.items():
        if set(qv) != {"q", "v"}:
            report.missing.append(f"blocks.{index}.attn.{'v' if 'q' in qv else 'q'}_bias")
            continue
        out[f"encoder.layers.{index}.self_attn.qkv.bias"] = torch.cat((qv["q"], torch.zeros_like(qv["v"]), qv["v"]))
    return out, report


# --------------------------------------------------------------------------- BLIP-2 Q-Former


_QFORMER_IGNORED = re.compile(
    r"^(t5_proj\.|t5_model\.|opt_proj\.|opt_model\.|llm_proj\.|vision_proj\.|text_proj\.|itm_head\.|Qformer\.cls\.|"
    r"Qformer\.bert\.embeddings\.(position_ids|word_embeddings\.|position_embeddings\.)|"
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|temp$)"
)


def convert_blip2_qformer(sd: Mapping[str, torch.Tensor], file: str) -> tuple[dict, CoverageReport]:
    """Map a LAVIS BLIP-2 checkpoint onto ``{"qformer.*", "query_tokens", "ln_vision.*"}``.

    ``Qformer.bert.embeddings.LayerNorm`` → ``qformer.layernorm``; inside (cross-)attention
    ``.self.`` → ``.attention.``.  The text side of BERT (word/position embeddings, the text
    FFN ``intermediate``/``output``, the LM head) is not part of MiniGPT-4 and is ignored.
    """
    report = CoverageReport(file=file, role="Q-Former")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _QFORMER_IGNORED.match(key):
            report.ignored.append(key)
        elif key == "query_tokens" or key.startswith("ln_vision."):
            out[key] = value
        elif key.startswith("Qformer.bert.embeddings.LayerNorm."):
            out["qformer.layernorm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("Qformer.bert.encoder."):
            rest = key[len("Qformer.bert.") :]
            rest = rest.replace(".attention.self.", ".attention.attention.")
            rest = rest.replace(".crossattention.self.", ".crossattention.attention.")
            out["qformer." + rest] = value
        else:
            report.unexpected.append(key)
    return out, report


# --------------------------------------------------------------------------- stage-2 projection (+ LoRA)


_LORA_KEY = re.compile(r"^llama_model\.base_model\.model\.(.+)\.(lora_[AB])(?:\.default)?\.weight$")


def convert_projection(sd: Mapping[str, torch.Tensor], file: str) -> tuple[dict, dict, CoverageReport]:
    """Split a stage-2 checkpoint into ``llama_proj.*`` (+ ``ln_vision.*`` if present) and LoRA weights.

    LoRA keys written by peft 0.2.0 (``…q_proj.lora_A.weight``) are renamed to the adapter
    name ``default`` used by current peft (``…q_proj.lora_A.default.weight``) and made
    relative to the bare ``LlamaForCausalLM``.
    """
    report = CoverageReport(file=file, role="projection")
    proj: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(("llama_proj.", "ln_vision.")):
            proj[key] = value
        elif m := _LORA_KEY.match(key):
            lora[f"{m.group(1)}.{m.group(2)}.default.weight"] = value
        else:
            report.unexpected.append(key)
    return proj, lora, report


# --------------------------------------------------------------------------- coverage-checked loading


def load_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    report: CoverageReport,
    *,
    allow_missing: Iterable[str] = (),
    hint: str = "",
) -> CoverageReport:
    """Load ``state`` into ``module`` only if every parameter is present with the right shape.

    Works on modules built on the ``meta`` device (``assign=True`` takes the checkpoint's
    tensors), so real ViT-g weights are never randomly initialised first.
    """
    expected = module.state_dict()
    allowed = set(allow_missing)
    missing = sorted(set(expected) - set(state) - allowed) + report.missing
    extra = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file has {tuple(state[k].shape)}, model needs {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or shapes:
        lines = [f"{report.file} does not fit the {report.role}:"]
        if shapes:
            lines += ["  size mismatch: " + s for s in shapes[:8]]
            if len(shapes) > 8:
                lines.append(f"  … and {len(shapes) - 8} more size mismatches")
        if missing:
            lines.append(
                f"  missing {len(missing)} tensor(s): {', '.join(missing[:8])}" + (" …" if len(missing) > 8 else "")
            )
        if hint:
            lines.append("  " + hint)
        raise CheckpointError("\n".join(lines))
    report.unexpected += extra
    usable = {k: v for k, v in state.items() if k in expected}
    module.load_state_dict(usable, strict=False, assign=True)
    report.loaded += len(usable)
    report.missing = []
    return report
