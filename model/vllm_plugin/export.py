"""``minigpt4-bot weights export``: the four original MiniGPT-4 files → one model folder vLLM loads.

The files are read by the *serving* loader (:func:`model.loader.load_minigpt4`: the same key maps,
coverage checks, 448-px position-embedding interpolation and LoRA injection as the local engine), in
the LLM checkpoint's dtype, and the loaded modules are written under the names
:class:`~model.vllm_plugin.modeling.MiniGPT4ForConditionalGeneration` loads.  The two things the loader
computes at load time (the interpolated position embedding, the LoRA factors) are recomputed in float32
with the loader's own functions, so the vLLM model computes with exactly the local engine's numbers.

The folder::

    config.json              MiniGPT4Config (architectures = [MiniGPT4ForConditionalGeneration])
    model.safetensors        every tensor of the vLLM model, nothing else (checked: expected_shapes);
                             over 2 GiB: model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer files          the LLM's, plus <ImageHere> as an added token = image_token_id
    chat_template.jinja      the variant's reference conversation template, for `vllm serve DIR`
    minigpt4_export.json     manifest: variant, template, image_token_id, num_image_tokens, source sha256s

Precision: each tensor is written in the LLM checkpoint's dtype when that round-trips it exactly
(fp16 files stay fp16), otherwise in float32 — the interpolated v2 position embedding, the merged LoRA
projections and anything computed at load time keep every bit the local engine uses.

MiniGPT-v2's LoRA (r=64, alpha=16 on ``q_proj``/``v_proj``) is **merged** into the LLM weights here
(``W + alpha/r · B·A`` in float32, :func:`_float32_parts`) instead of served through vLLM's LoRA
support: the adapter is fixed (one per model, never switched per request), merging costs nothing at
inference, and vLLM with a LoRA config on CPU forces compilation off (``vllm/platforms/cpu.py``).  The
merged product differs from the reference's separate ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` by float rounding only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.checkpoints import CheckpointError
from model.conversation import IMAGE_PLACEHOLDER, ConversationTemplate
from model.vllm_plugin.configuration import MiniGPT4Config, expected_shapes

__all__ = ["MANIFEST", "ExportReport", "chat_template", "check_export", "export_model", "vllm_state"]

log = logging.getLogger(__name__)

MANIFEST = "minigpt4_export.json"
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class ExportReport:
    """What the export wrote and what it left out (and why)."""

    out: Path
    variant: str
    tensors: int = 0
    bytes: int = 0
    image_token_id: int = 0
    num_image_tokens: int = 0
    ignored: dict[str, list[str]] = field(default_factory=dict)  # source file → keys the reference ignores too
    notes: list[str] = field(default_factory=list)


def export_model(
    out: str | os.PathLike[str],
    *,
    variant: str = "vicuna0",
    llm: str | os.PathLike[str] = "",
    vit: str | os.PathLike[str] = "",
    qformer: str | os.PathLike[str] | None = None,
    projection: str | os.PathLike[str] = "",
    vision: Mapping[str, Any] | None = None,
    qformer_dims: Mapping[str, Any] | None = None,
    progress: Callable[[str, int], None] | None = None,
    **_precision: Any,
) -> ExportReport:
    """Load the original files as serving does and write the vLLM model folder ``out``.

    The files are read on the CPU in the LLM checkpoint's own dtype (fp16 for Vicuna / LLaMA-2: exact, and
    half the memory of float32 — a 7B export needs about 16 GB); what the loader computes at load time is
    recomputed in float32 (:func:`_float32_parts`).  ``device`` / ``dtype`` / ``quantization`` of
    ``[model]`` are accepted and ignored: vLLM applies its own ``dtype`` when it loads the folder.
    Raises :class:`CheckpointError` (with the loader's or the coverage check's message) when a file
    does not fit; nothing is left half-written in ``out`` then.
    """
    from model.loader import load_minigpt4

    out = Path(out).expanduser()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).is_file())):
        raise CheckpointError(f"{out} exists and is not an earlier export (no {MANIFEST}): choose another --out")
    store_dtype = _checkpoint_dtype(Path(llm).expanduser())
    model = load_minigpt4(variant=variant, llm=llm, vit=vit, qformer=qformer, projection=projection,
                          device="cpu", dtype=str(store_dtype).removeprefix("torch."), vision=vision,
                          qformer_dims=qformer_dims, progress=progress)  # fmt: skip
    config = _config(model)
    state = vllm_state(model) | _float32_parts(model, vit, projection)
    state = {k: _narrowest(v, store_dtype) for k, v in state.items()}
    _check(state, config, f"the export of {variant}")

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_shards(state, tmp)
    config.save_pretrained(tmp)
    _export_tokenizer(Path(llm).expanduser(), tmp, config.image_token_id)
    (tmp / "chat_template.jinja").write_text(chat_template(model.spec.template))
    report = ExportReport(out, variant, len(state), sum(t.numel() * t.element_size() for t in state.values()),
                          config.image_token_id, config.num_image_tokens)  # fmt: skip
    load = model.load_report
    if load is not None:
        report.ignored = {f.file: list(f.ignored) + list(f.unexpected) for f in load.files if f.ignored or f.unexpected}
        if load.llm_ignored:
            report.ignored[str(llm)] = list(load.llm_ignored)
    if not model.spec.has_qformer and not _file_has(projection, "ln_vision.weight"):
        report.notes.append("ln_vision: LayerNorm defaults (weight 1, bias 0), as the reference (in no file)")
    if model.spec.lora is not None:
        report.notes.append(f"LoRA r={load.lora_rank if load else '?'} alpha={model.spec.lora.alpha} merged "
                            "into q_proj/v_proj (float32)")  # fmt: skip
    sources = {"llm": llm, "vit": vit, "qformer": qformer, "projection": projection}
    manifest = {
        "variant": variant,
        "template": model.spec.template.name,
        "image_token_id": config.image_token_id,
        "num_image_tokens": config.num_image_tokens,
        "image_size": config.image_size,
        "stop_strings": list(model.spec.stop_strings),
        "sources": {role: _describe(p) for role, p in sources.items() if p},
        "ignored": report.ignored,
        "notes": report.notes,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    check_export(tmp)  # the written file, read back: what vLLM will load
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("export: %s (%s): %d tensors, %.1f MiB", out, variant, report.tensors, report.bytes / 2**20)
    return report


# --------------------------------------------------------------------------- names


def vllm_state(model: Any) -> dict[str, torch.Tensor]:
    """A loaded :class:`~model.minigpt4.MiniGPT4` → ``{vLLM name: tensor}`` (LoRA factors dropped: see
    :func:`_float32_parts` for the merged weights).

    Every persistent tensor of the model must map to a name; an unknown one is an error, never dropped.
    """
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for name, tensor in model.state_dict().items():
        if name.startswith("visual_encoder."):
            out["vision_model." + name[len("visual_encoder.") :]] = tensor
        elif name.startswith(("ln_vision.", "qformer.", "llama_proj.")) or name == "query_tokens":
            out[name] = tensor
        elif name.startswith("llm.") and ".lora_" not in name:
            out["language_model." + name[len("llm.") :].replace(".base_layer.", ".")] = tensor
        elif ".lora_" not in name:
            unmapped.append(name)
    if unmapped:
        raise CheckpointError(f"internal: no vLLM name for {', '.join(unmapped[:8])}")
    return out


def _float32_parts(model: Any, vit: Any, projection: Any) -> dict[str, torch.Tensor]:
    """What the loader computes at load time, in float32 from the files (the model holds the storage dtype).

    * the position embedding, interpolated to the variant's grid (MiniGPT-v2: 16×16 → 32×32) by the
      loader's own :func:`~model.checkpoints.interpolate_pos_embed`;
    * each LoRA target merged: ``W + scaling · B·A`` with the file's factors and peft's ``scaling``
      (alpha / r) of the layer the loader injected.
    """
    from model.checkpoints import convert_projection, interpolate_pos_embed, read_state_dict

    out: dict[str, torch.Tensor] = {}
    vit_sd = read_state_dict(vit, "vision encoder (eva_vit_g.pth)")
    if "pos_embed" in vit_sd:
        out["vision_model.embeddings.position_embedding"] = interpolate_pos_embed(
            vit_sd["pos_embed"], model.spec.vision.grid
        )
    if model.spec.lora is None:
        return out
    _proj, lora, _report = convert_projection(
        read_state_dict(projection, "projection", wrapper_key="model"), str(projection)
    )
    from peft.tuners.lora import LoraLayer

    for name, module in model.llm.named_modules():
        if isinstance(module, LoraLayer):
            a = lora[f"{name}.lora_A.default.weight"].float()
            b = lora[f"{name}.lora_B.default.weight"].float()
            base = module.get_base_layer().weight.float()
            out[f"language_model.{name}.weight"] = base + module.scaling["default"] * (b @ a)
    return out


def _save_shards(state: Mapping[str, torch.Tensor], folder: Path, shard_bytes: int = 2 * 2**30) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index when over ``shard_bytes``.

    Shards keep the writer's extra memory to one shard (safetensors serialises a file in memory).
    """
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------- checks


def _check(state: Mapping[str, torch.Tensor], config: MiniGPT4Config, what: str) -> None:
    """Every tensor the vLLM model has, with its shape, and no other (else a :class:`CheckpointError`)."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [f"{k}: has {tuple(state[k].shape)}, the model needs {expected[k]}"
              for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != expected[k]]  # fmt: skip
    if not (missing or extra or shapes):
        return
    lines = [f"{what} does not fit the vLLM MiniGPT-4 model ({config.variant}):"]
    lines += [f"  size mismatch: {s}" for s in shapes[:8]]
    if missing:
        lines.append(
            f"  missing {len(missing)} tensor(s): {', '.join(missing[:8])}" + (" …" if len(missing) > 8 else "")
        )
    if extra:
        lines.append(f"  {len(extra)} tensor(s) the model has no place for: {', '.join(extra[:8])}")
    lines.append("  re-run minigpt4-bot weights export with the [model] files of this variant")
    raise CheckpointError("\n".join(lines))


def check_export(folder: str | os.PathLike[str]) -> MiniGPT4Config:
    """Check an exported folder's ``model.safetensors`` against its ``config.json`` (names and shapes)."""
    from safetensors import safe_open

    folder = Path(folder).expanduser()
    config_file, files = folder / "config.json", sorted(folder.glob("*.safetensors"))
    if not config_file.is_file() or not files:
        raise CheckpointError(f"{folder} is not a MiniGPT-4 export (no config.json / model.safetensors)")
    config = MiniGPT4Config.from_json_file(str(config_file))
    shapes: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            shapes |= {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
    _check(shapes, config, f"{folder}/*.safetensors")
    return config


# --------------------------------------------------------------------------- config, dtype


def _config(model: Any) -> MiniGPT4Config:
    spec = model.spec
    vision_config = model.visual_encoder.config.to_dict()
    qformer_config = model.qformer.config.to_dict() if model.qformer is not None else None
    text = model.llm.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        text.pop(key, None)
    text["architectures"] = ["LlamaForCausalLM"]
    vocab = int(model.llm.config.vocab_size)
    return MiniGPT4Config(
        variant=spec.name,
        template=spec.template.name,
        vision_config=vision_config,
        qformer_config=qformer_config,
        text_config=text,
        num_query_tokens=spec.qformer.num_query_token if spec.qformer else 0,
        group_tokens=spec.group_tokens,
        ln_vision_eps=spec.vision.ln_vision_eps,
        num_image_tokens=spec.num_visual_tokens,
        image_token_id=vocab,  # one past the embedding table: never a text token
        dtype=str(text.get("dtype") or text.get("torch_dtype") or "float16"),
    )


def _checkpoint_dtype(llm_dir: Path) -> torch.dtype:
    """The LLM checkpoint's storage dtype (``config.json`` ``dtype``/``torch_dtype``), float16 if unsaid."""
    try:
        raw = json.loads((llm_dir / "config.json").read_text())
    except (OSError, ValueError):
        raw = {}
    name = str(raw.get("dtype") or raw.get("torch_dtype") or "float16")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


def _narrowest(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype`` if that is exact, else in float32 (never a rounding the local engine lacks)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == dtype or not tensor.is_floating_point():
        return tensor
    narrow = tensor.to(dtype)
    return narrow if torch.equal(narrow.to(tensor.dtype), tensor) else tensor.float()


def _file_has(path: Any, key: str) -> bool:
    from model.checkpoints import read_state_dict

    try:
        return key in read_state_dict(path, "projection", wrapper_key="model")
    except CheckpointError:
        return False


def _describe(path: Any) -> dict[str, Any]:
    """A source file's name and sha256 (a directory: each weight and tokenizer file in it)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(
            f for f in p.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".model")
        )
        return {"path": str(p), "files": {f.name: _sha256(f) for f in files}}
    return {"path": str(p), "sha256": _sha256(p)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- tokenizer, chat template


def _export_tokenizer(llm_dir: Path, out: Path, image_token_id: int) -> None:
    """The LLM's tokenizer with ``<ImageHere>`` added as the one token ``image_token_id``.

    The SentencePiece ``tokenizer.model`` is copied as is (the bot's decoder reads it); the added token
    lets ``vllm serve DIR`` users send the exported chat template's text.
    """
    from transformers import AutoTokenizer

    for name in _TOKENIZER_FILES:
        if (llm_dir / name).is_file():
            shutil.copy2(llm_dir / name, out / name)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir, legacy=True)
    if len(tokenizer) != image_token_id:
        raise CheckpointError(
            f"the tokenizer in {llm_dir} has {len(tokenizer)} tokens but the LLM {image_token_id} embeddings: "
            f"{IMAGE_PLACEHOLDER} needs the id right after the vocabulary (a Vicuna v0 32001-token delta?)"
        )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    if tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) != image_token_id:
        raise CheckpointError(f"internal: {IMAGE_PLACEHOLDER} did not get id {image_token_id}")
    tokenizer.save_pretrained(out)
    # legacy=True (how the loader reads every LLaMA tokenizer: the reference's slow SentencePiece behaviour)
    # must be in the file, since vLLM loads the folder's tokenizer with no arguments.
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["legacy"] = True
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def chat_template(template: ConversationTemplate) -> str:
    """A Jinja chat template rendering ``template`` as :func:`model.conversation.build_prompt` does.

    For ``vllm serve DIR`` (OpenAI chat API): each picture of a user message (vLLM puts one
    ``<ImageHere>`` per picture in its text) becomes its own ``<Img><ImageHere></Img>`` message, and the
    text joins the last picture's message after one space (``Chat.upload_img`` then ``Chat.ask``).  It
    starts with the BOS token, which the reference's first segment carries.
    """
    user, assistant = template.roles
    consts = {"system": template.system, "sep": template.sep, "user": user, "assistant": assistant}
    header = "".join(f"{{%- set {k} = {json.dumps(v)} -%}}\n" for k, v in consts.items())
    return header + _TEMPLATE_BODY


_TEMPLATE_BODY = """{{- bos_token + system + sep -}}
{%- for message in messages -%}
  {%- if message['content'] is string -%}
    {%- set content = message['content'] -%}
  {%- else -%}
    {%- set ns = namespace(text='') -%}
    {%- for part in message['content'] -%}
      {%- if part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}
      {%- else -%}{%- set ns.text = ns.text + '<ImageHere>' -%}{%- endif -%}
    {%- endfor -%}
    {%- set content = ns.text -%}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {%- set pictures = content.count('<ImageHere>') -%}
    {%- set text = content.replace('<ImageHere>', '').strip() -%}
    {%- for i in range(pictures) -%}
      {%- if loop.last and text -%}{{- user + '<Img><ImageHere></Img> ' + text + sep -}}
      {%- else -%}{{- user + '<Img><ImageHere></Img>' + sep -}}{%- endif -%}
    {%- endfor -%}
    {%- if pictures == 0 -%}{{- user + text + sep -}}{%- endif -%}
  {%- elif message['role'] == 'assistant' -%}
    {%- if content -%}{{- assistant + content + sep -}}{%- else -%}{{- assistant -}}{%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- assistant -}}{%- endif -%}
"""
