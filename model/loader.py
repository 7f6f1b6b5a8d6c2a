"""Build a :class:`~model.minigpt4.MiniGPT4` from the original published files.

Load order follows the reference (``MiniGPT4.from_config``): LLM + tokenizer → ViT
(``eva_vit_g.pth``) → Q-Former, ``query_tokens`` and ``ln_vision`` (BLIP-2 file, Q-Former
variant only) → ``llama_proj`` (+ MiniGPT-v2 LoRA) from the stage-2 checkpoint.  Unlike the
reference every file must cover its module with the right shapes (see
:mod:`model.checkpoints`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch

from model.checkpoints import (
    CheckpointError,
    CoverageReport,
    convert_blip2_qformer,
    convert_eva_vit,
    convert_projection,
    iter_tensors,
    load_checked,
    read_state_dict,
    to_targets,
)
from model.memory import auto_cpu_dtype
from model.minigpt4 import MiniGPT4
from model.report import LoadReport
from model.variants import VariantSpec, get_variant

__all__ = ["LoadReport", "PrecisionError", "load_minigpt4", "resolve_precision", "weights_size"]


def weights_size(*paths: Any) -> int:
    """Total bytes the loader will read (for a progress bar's total)."""
    return sum(_size(p) for p in paths if p)


log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("none", "int8", "nf4")


class PrecisionError(RuntimeError):
    """The requested device / dtype / quantization cannot run on this machine."""


def resolve_precision(device: str, dtype: str, quantization: str) -> tuple[torch.device, torch.dtype]:
    """Check that the precision mode can run here, with an actionable error if not."""
    quantization = quantization or "none"
    if quantization not in QUANTIZATIONS:
        raise PrecisionError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise PrecisionError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PrecisionError(
            f"device {device!r} was requested but PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}; a CPU build has no CUDA — see README, 'GPU install'). "
            'Set device = "cpu" to run on the CPU.'
        )
    if dtype == "auto":
        dtype = "float16" if dev.type == "cuda" else "float32"
    if dtype not in _DTYPES:
        raise PrecisionError(f"dtype must be one of float32, float16, bfloat16, auto; got {dtype!r}")
    if quantization != "none":
        if dev.type != "cuda":
            raise PrecisionError(
                f"quantization {quantization!r} needs a CUDA GPU (bitsandbytes); on {dev.type} use "
                'quantization = "none" with dtype float32 (exact) or bfloat16 (half the memory)'
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise PrecisionError(f"quantization {quantization!r} needs bitsandbytes: pip install 'minigpt4-bot[gpu]'")
        if dtype == "float32":
            dtype = "float16"  # the reference's low_resource mode: int8 weights, fp16 activations
    return dev, _DTYPES[dtype]


def _quantization_config(quantization: str, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
    )


def _load_llm(path: str, dev: torch.device, dtype: torch.dtype, quantization: str) -> tuple[Any, Any, list[str]]:
    from transformers import AutoTokenizer, LlamaConfig

    llm_dir = Path(path).expanduser()
    if not (llm_dir / "config.json").is_file():
        raise CheckpointError(
            f"LLM directory {llm_dir} has no config.json; point [model].llm at a Hugging Face "
            "LLaMA/Vicuna directory (config.json, tokenizer.model, weights)"
        )
    config = LlamaConfig.from_pretrained(llm_dir)
    if getattr(config, "model_type", "llama") != "llama":
        raise CheckpointError(f"{llm_dir} holds a {config.model_type!r} model; MiniGPT-4 needs a LLaMA model")
    # legacy=True: the reference's slow SentencePiece tokenizer (`[INST]` after `<s>` → `▁[`, `INST`, `]`).
    if not any((llm_dir / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise CheckpointError(
            f"LLM directory {llm_dir} has no tokenizer (tokenizer.model or tokenizer.json); copy the "
            "tokenizer files of the LLaMA/Vicuna release into it"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm_dir, legacy=True)
    except (OSError, ValueError, ImportError) as exc:
        raise CheckpointError(f"could not load the tokenizer in {llm_dir}: {exc}") from exc
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer in {llm_dir} has {len(tokenizer)} tokens but the model only {config.vocab_size} "
            "embeddings — a known Vicuna v0 delta mismatch (32001 vs 32000): re-apply the delta with the "
            "FastChat version that matches your Vicuna weights"
        )
    if quantization != "none":
        return _load_llm_quantized(llm_dir, tokenizer, dev, dtype, quantization)
    llm, unexpected = _load_llm_streamed(llm_dir, config, dev, dtype)
    return llm, tokenizer, unexpected


def _load_llm_quantized(
    llm_dir: Path, tokenizer: Any, dev: torch.device, dtype: torch.dtype, quantization: str
) -> tuple[Any, Any, list[str]]:
    """int8 / nf4 through transformers + bitsandbytes (CUDA), which quantize while loading."""
    from transformers import LlamaForCausalLM

    kwargs: dict[str, Any] = dict(dtype=dtype, output_loading_info=True, device_map={"": dev})
    kwargs["quantization_config"] = _quantization_config(quantization, dtype)
    try:
        # output_loading_info=True: (model, info), which transformers' return annotation does not say
        loaded = LlamaForCausalLM.from_pretrained(llm_dir, **kwargs)
        llm, info = cast(tuple[LlamaForCausalLM, dict[str, Any]], loaded)
    except OSError as exc:
        raise CheckpointError(f"could not load the LLM weights in {llm_dir}: {exc}. {_LLM_FILES_HINT}") from exc
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("rotary_emb.inv_freq")]
    mismatched = info.get("mismatched_keys", [])
    _raise_uncovered(llm_dir, missing, list(mismatched))
    llm.eval().requires_grad_(False)
    return llm, tokenizer, sorted(info.get("unexpected_keys", []))


_LLM_FILES_HINT = (
    "The directory needs model.safetensors or pytorch_model.bin (or their sharded index) from save_pretrained"
)


def _raise_uncovered(llm_dir: Path, missing: list[str], mismatched: list[str]) -> None:
    if missing or mismatched:
        raise CheckpointError(
            f"the LLM weights in {llm_dir} do not cover the model: missing {sorted(missing)[:8]} "
            f"mismatched {mismatched[:8]}"
        )


def llm_weight_files(llm_dir: Path) -> list[Path]:
    """The LLM's weight files, from the sharded index if there is one (safetensors before .bin)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (llm_dir / index).is_file():
            try:
                names = sorted(set(json.loads((llm_dir / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise CheckpointError(f"could not read {llm_dir / index}: {exc}") from exc
            return [llm_dir / name for name in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (llm_dir / single).is_file():
            return [llm_dir / single]
    raise CheckpointError(f"could not load the LLM weights in {llm_dir}: no weight files. {_LLM_FILES_HINT}")


def _load_llm_streamed(llm_dir: Path, config: Any, dev: torch.device, dtype: torch.dtype) -> tuple[Any, list[str]]:
    """Build the LLM on the meta device and fill it one tensor at a time, converted on the way.

    transformers' ``from_pretrained`` keeps every shard mapped until the end, so converting fp16 files
    to bfloat16 peaked at twice the weights; here at most one tensor of the file is held besides the
    loaded model (:func:`model.checkpoints.iter_tensors`), so a 7B model loads within 1.25× its bytes.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import GenerationConfig, LlamaForCausalLM

    config.dtype = dtype
    with init_empty_weights(include_buffers=False):  # rotary inv_freq is computed, not loaded: keep it real
        llm = LlamaForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in llm.state_dict().items()}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for file in llm_weight_files(llm_dir):
        for key, tensor in iter_tensors(file, "LLM"):
            name = key if key in expected else f"model.{key}" if f"model.{key}" in expected else None
            if name is None:
                unexpected.append(key)
            elif tuple(tensor.shape) != expected[name]:
                mismatched.append(f"{key}: file has {tuple(tensor.shape)}, model needs {expected[name]}")
            else:
                target = dtype if tensor.is_floating_point() else None
                set_module_tensor_to_device(llm, name, dev, value=tensor, dtype=target)
            del tensor
    if config.tie_word_embeddings:
        llm.tie_weights()
    missing = [k for k, v in llm.state_dict().items() if v.is_meta]
    _raise_uncovered(llm_dir, missing, mismatched)
    # the computed buffers (parameters are already there).
    # transformers' @wraps(nn.Module.to) hides `self` from mypy (typeshed's _Wrapped is no descriptor)
    llm.to(dev)  # type: ignore[arg-type]
    with contextlib.suppress(OSError):  # no generation_config.json: the one built from config.json stays
        llm.generation_config = GenerationConfig.from_pretrained(llm_dir)
    llm.eval().requires_grad_(False)
    return llm, sorted(unexpected)


def _apply_lora(model: MiniGPT4, spec: VariantSpec, lora: Mapping[str, torch.Tensor], report: CoverageReport) -> int:
    from peft import LoraConfig, inject_adapter_in_model

    assert spec.lora is not None
    ranks = {v.shape[0] for k, v in lora.items() if ".lora_A." in k}
    if not ranks:
        raise CheckpointError(
            f"{report.file} has no LoRA weights (llama_model.base_model.model.….lora_A.weight); "
            "MiniGPT-v2 needs its own checkpoint, not a MiniGPT-4 stage-2 file"
        )
    if len(ranks) != 1:
        raise CheckpointError(f"{report.file} mixes LoRA ranks {sorted(ranks)}")
    rank = ranks.pop()
    config = LoraConfig(
        r=rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=list(spec.lora.target_modules),
        bias="none",
    )
    inject_adapter_in_model(config, model.llm)
    expected = {k for k in model.llm.state_dict() if ".lora_" in k}
    absent = sorted(expected - set(lora))
    extra = sorted(set(lora) - expected)
    if absent or extra:
        raise CheckpointError(
            f"{report.file}: LoRA weights do not fit the LLM — missing {absent[:6]}, unexpected {extra[:6]}"
        )
    model.llm.load_state_dict(dict(lora), strict=False)
    # transformers' @wraps(nn.Module.to) hides `self` from mypy (typeshed's _Wrapped is no descriptor)
    model.llm.to(model.device)  # type: ignore[arg-type]
    model.llm.eval().requires_grad_(False)
    report.loaded += len(lora)
    return rank


def _vision_hint(spec: VariantSpec, vit_sd: Mapping[str, torch.Tensor]) -> str:
    cls = vit_sd.get("cls_token")
    if cls is None or cls.shape[-1] == spec.vision.width:
        return ""
    blocks = {k.split(".")[1] for k in vit_sd if k.startswith("blocks.")}
    return (
        f"The file holds a ViT of width {cls.shape[-1]} with {len(blocks)} blocks; the model expects width "
        f"{spec.vision.width} and {spec.vision.depth} blocks (EVA ViT-g drops the 40th). For a non-standard "
        "checkpoint give its sizes in [model.vision]."
    )


def _projection_hint(spec: VariantSpec, proj: Mapping[str, torch.Tensor], llm_hidden: int) -> str:
    weight = proj.get("llama_proj.weight")
    if weight is None:
        return ""
    out_f, in_f = weight.shape
    sizes = {4096: "7B", 5120: "13B", 6656: "33B", 8192: "70B"}
    if out_f != llm_hidden:
        return (
            f"This projection maps into a {out_f}-wide LLM ({sizes.get(out_f, '?')}) but the configured LLM "
            f"has hidden size {llm_hidden} ({sizes.get(llm_hidden, '?')}); use the stage-2 checkpoint that "
            "matches your LLM (e.g. prerained_minigpt4_7b.pth for Vicuna-7B)."
        )
    if in_f != spec.projection_in_features:
        need = "the Q-Former width" if spec.has_qformer else f"{spec.group_tokens} × the ViT width (no Q-Former)"
        return (
            f"Its input is {in_f}-wide, but variant {spec.name!r} feeds it {spec.projection_in_features} "
            f"({need}). Q-Former checkpoints (vicuna0) take the Q-Former width, LLaMA-2 / MiniGPT-v2 "
            "checkpoints 4 × the ViT width; check [model].variant."
        )
    return ""


def load_minigpt4(
    variant: str = "vicuna0",
    llm: str | os.PathLike[str] = "",
    vit: str | os.PathLike[str] = "",
    qformer: str | os.PathLike[str] | None = None,
    projection: str | os.PathLike[str] = "",
    device: str = "cpu",
    dtype: str = "float32",
    quantization: str = "none",
    vision: Mapping[str, Any] | None = None,
    qformer_dims: Mapping[str, Any] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> MiniGPT4:
    """Load MiniGPT-4 from the original checkpoint files (the acceptance contract).

    ``vision`` / ``qformer_dims`` override ViT-g / BERT-base sizes for tiny models (keys as in
    ``shared/parity/config.json``).  ``progress(step, bytes)`` is called after each file.
    The returned model is in eval mode with ``model.load_report`` describing what was read.
    """
    spec = get_variant(variant).with_dims(vision, qformer_dims)
    dev, torch_dtype = resolve_precision(device, dtype, quantization)
    if dtype == "auto" and dev.type == "cpu":
        torch_dtype = auto_cpu_dtype(spec, llm, dev)
    if spec.has_qformer and not qformer:
        raise CheckpointError(f"variant {spec.name!r} needs the BLIP-2 Q-Former file ([model].qformer)")
    report = LoadReport(spec.name, str(dev), str(torch_dtype).removeprefix("torch."), quantization or "none")
    step = progress or (lambda _name, _size: None)

    llm_model, tokenizer, llm_extra = _load_llm(str(llm), dev, torch_dtype, quantization or "none")
    report.llm_ignored = llm_extra
    step("LLM", _size(llm))
    llm_hidden = int(llm_model.config.hidden_size)
    spm_file = Path(llm).expanduser() / "tokenizer.model"
    model = MiniGPT4(spec, llm_model, tokenizer, llm_hidden, str(spm_file) if spm_file.is_file() else None)
    fp32 = lambda _key: torch.float32  # noqa: E731 — ln_vision, Q-Former, queries, projection
    report.files.append(_load_vision(model, spec, vit, dev, torch_dtype))
    step("vision encoder", _size(vit))

    if spec.has_qformer:
        q_sd = read_state_dict(qformer, "Q-Former (blip2_pretrained_flant5xxl.pth)", wrapper_key="model")  # type: ignore[arg-type]
        q_state, q_report = convert_blip2_qformer(q_sd, str(qformer))
        del q_sd  # ignored tensors (t5_proj …) go with it
        q_state = to_targets(q_state, dev, fp32)
        assert model.qformer is not None
        qformer_part = {k[len("qformer.") :]: q_state.pop(k) for k in list(q_state) if k.startswith("qformer.")}
        load_checked(model.qformer, qformer_part, q_report)
        del qformer_part
        holder = _Holder(query_tokens=model.query_tokens, ln_vision=model.ln_vision)
        load_checked(holder, q_state, q_report, hint="the BLIP-2 file must hold query_tokens and ln_vision")
        model.query_tokens = holder.query_tokens
        report.files.append(q_report)
        del q_state
        step("Q-Former", _size(qformer))

    p_sd = read_state_dict(projection, "projection (stage-2 checkpoint)", wrapper_key="model")
    proj, lora, p_report = convert_projection(p_sd, str(projection))
    del p_sd  # optimizer state and the like
    proj = to_targets(proj, dev, fp32)
    if not spec.has_qformer and any(k.startswith("ln_vision.") for k in proj):
        load_checked(
            model.ln_vision,
            {k[len("ln_vision.") :]: v for k, v in proj.items() if k.startswith("ln_vision.")},
            p_report,
        )
    proj_only = {k[len("llama_proj.") :]: v for k, v in proj.items() if k.startswith("llama_proj.")}
    load_checked(model.llama_proj, proj_only, p_report, hint=_projection_hint(spec, proj, llm_hidden))
    if spec.lora is not None:
        report.lora_rank = _apply_lora(model, spec, lora, p_report)
    elif lora:
        raise CheckpointError(
            f"{projection} carries LoRA weights (a MiniGPT-v2 checkpoint) but variant is {spec.name!r}; "
            'set [model].variant = "minigptv2"'
        )
    report.files.append(p_report)
    step("projection", _size(projection))

    _place(model, dev, torch_dtype)
    model.eval().requires_grad_(False)
    model.load_report = report
    return model


def _load_vision(
    model: MiniGPT4, spec: VariantSpec, vit: str | os.PathLike[str], dev: torch.device, dtype: torch.dtype
) -> CoverageReport:
    """``eva_vit_g.pth`` into the ViT, each tensor converted to ``dtype`` on ``dev`` as soon as it is read."""
    vit_sd = read_state_dict(vit, "vision encoder (eva_vit_g.pth)")
    hint = _vision_hint(spec, vit_sd)
    vit_state, vit_report = convert_eva_vit(vit_sd, spec.vision.depth, spec.vision.grid, str(vit))
    del vit_sd  # the 40th block the reference drops goes with it
    vit_state = to_targets(vit_state, dev, lambda _key: dtype)
    return load_checked(model.visual_encoder, vit_state, vit_report, hint=hint)


class _Holder(torch.nn.Module):
    """Gives ``query_tokens`` / ``ln_vision`` one state-dict namespace for a coverage check."""

    def __init__(self, query_tokens: torch.nn.Parameter | None, ln_vision: torch.nn.Module) -> None:
        super().__init__()
        self.query_tokens = query_tokens
        self.ln_vision = ln_vision


def _place(model: MiniGPT4, dev: torch.device, dtype: torch.dtype) -> None:
    """ViT in the compute dtype; ``ln_vision``, Q-Former, queries and projection in fp32 (as HF/LAVIS keep them)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta and not name.startswith("llm."):
            raise CheckpointError(f"internal: {name} was not loaded from any file")
    # transformers' @wraps(nn.Module.to) hides `self` from mypy (typeshed's _Wrapped is no descriptor)
    model.visual_encoder.to(dev, dtype)  # type: ignore[arg-type]
    model.ln_vision.to(dev, torch.float32)
    model.llama_proj.to(dev, torch.float32)
    if model.qformer is not None:
        model.qformer.to(dev, torch.float32)  # type: ignore[arg-type]  # the same @wraps
        assert model.query_tokens is not None
        model.query_tokens.data = model.query_tokens.data.to(dev, torch.float32)


def _size(path: Any) -> int:
    """Bytes of a file, or of the weight files in a directory (for progress bars)."""
    try:
        p = Path(path).expanduser()
        if p.is_dir():
            return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pth"))
        return p.stat().st_size
    except (OSError, TypeError):
        return 0
