"""Broken or mismatched files fail loudly with actionable messages (the reference's strict=False would not)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import model
from model.loader import resolve_precision


def _kwargs(demo_dir, files: str = "vicuna0", **overrides: Any) -> dict[str, Any]:
    """The loader arguments of one demo set, with some of them overridden."""
    return {**demo_dir[files].loader_kwargs(), **overrides}


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _err(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


def _refusal(demo_dir, key: str, broken: Path, blob: Any, files: str = "vicuna0") -> str:
    """Save ``blob`` as ``broken`` and load the demo set ``files`` with it as ``key``: the loader's message."""
    torch.save(blob, broken)
    with pytest.raises(model.CheckpointError) as exc:
        model.load_minigpt4(**_kwargs(demo_dir, files, **{key: str(broken)}))
    return _err(exc)


# ----------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("key", ["blocks.1.mlp.fc1.weight", "blocks.0.attn.proj.bias", "cls_token"])
def test_vit_missing_tensor(demo_dir, tmp_path, key):
    sd = _load(demo_dir["vicuna0"].vit)
    del sd[key]
    broken = tmp_path / "eva_vit_g.pth"
    msg = _refusal(demo_dir, "vit", broken, sd)
    assert str(broken) in msg
    assert "missing" in msg
    # the message names the tensor (in the loaded module's naming)
    names = {
        "blocks.1.mlp.fc1.weight": "layers.1.mlp.fc1.weight",
        "blocks.0.attn.proj.bias": "layers.0.self_attn.projection.bias",
        "cls_token": "class_embedding",
    }
    assert names[key] in msg


def test_vit_missing_q_bias_names_the_file_key(demo_dir, tmp_path):
    sd = _load(demo_dir["vicuna0"].vit)
    del sd["blocks.0.attn.q_bias"]
    broken = tmp_path / "eva_vit_g.pth"
    msg = _refusal(demo_dir, "vit", broken, sd)
    assert "blocks.0.attn.q_bias" in msg and str(broken) in msg


def test_vit_wrong_width(demo_dir, tmp_path):
    sd = _load(demo_dir["vicuna0"].vit)
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(100, 48, dtype=torch.float16)
    broken = tmp_path / "eva_vit_g.pth"
    msg = _refusal(demo_dir, "vit", broken, sd)
    assert "size mismatch" in msg and "(100, 48)" in msg and "(209, 48)" in msg


# ----------------------------------------------------------------------------- Q-Former


@pytest.mark.parametrize("key", ["query_tokens", "ln_vision.weight"])
def test_qformer_file_missing_query_tokens_or_ln_vision(demo_dir, tmp_path, key):
    blob = _load(demo_dir["vicuna0"].qformer)
    del blob["model"][key]
    broken = tmp_path / "blip2_pretrained_flant5xxl.pth"
    msg = _refusal(demo_dir, "qformer", broken, blob)
    assert key in msg and str(broken) in msg
    assert "query_tokens and ln_vision" in msg  # the hint


def test_qformer_file_missing_layer_tensor(demo_dir, tmp_path):
    blob = _load(demo_dir["vicuna0"].qformer)
    del blob["model"]["Qformer.bert.encoder.layer.2.crossattention.self.key.weight"]
    broken = tmp_path / "blip2.pth"
    msg = _refusal(demo_dir, "qformer", broken, blob)
    assert "layer.2.crossattention" in msg and str(broken) in msg


def test_vicuna0_without_qformer_file(demo_dir):
    with pytest.raises(model.CheckpointError, match="Q-Former"):
        model.load_minigpt4(**_kwargs(demo_dir, qformer=None))


# ----------------------------------------------------------------------------- projection


def test_projection_for_a_wider_llm(demo_dir, tmp_path):
    blob = _load(demo_dir["vicuna0"].projection)
    blob["model"]["llama_proj.weight"] = torch.zeros(5120, 32)
    blob["model"]["llama_proj.bias"] = torch.zeros(5120)
    broken = tmp_path / "pretrained_minigpt4_13b.pth"
    msg = _refusal(demo_dir, "projection", broken, blob)
    assert "5120" in msg and "hidden size 64" in msg and "13B" in msg
    assert broken.name in msg


def test_llama2_projection_with_vicuna0_variant(demo_dir):
    with pytest.raises(model.CheckpointError) as exc:
        model.load_minigpt4(**_kwargs(demo_dir, projection=str(demo_dir["llama2"].projection)))
    msg = _err(exc)
    assert "192" in msg and "32" in msg and "'vicuna0'" in msg and "variant" in msg
    assert demo_dir["llama2"].projection.name in msg


def test_vicuna0_projection_with_llama2_variant(demo_dir):
    with pytest.raises(model.CheckpointError) as exc:
        model.load_minigpt4(**_kwargs(demo_dir, "llama2", projection=str(demo_dir["vicuna0"].projection)))
    msg = _err(exc)
    assert "32" in msg and "192" in msg and "'llama2'" in msg and "variant" in msg


def test_bert_base_wide_projection_with_llama2_variant_is_named_qformer(demo_dir, tmp_path):
    blob = _load(demo_dir["llama2"].projection)
    blob["model"]["llama_proj.weight"] = torch.zeros(64, 768)  # a real Q-Former (BERT-base) projection
    broken = tmp_path / "pretrained_minigpt4.pth"
    msg = _refusal(demo_dir, "projection", broken, blob, "llama2")
    assert "768-wide" in msg and "'llama2' feeds it 192" in msg and "Q-Former checkpoints (vicuna0)" in msg


def test_lora_checkpoint_with_vicuna0_variant(demo_dir):
    with pytest.raises(model.CheckpointError) as exc:
        model.load_minigpt4(**_kwargs(demo_dir, projection=str(demo_dir["minigptv2"].projection)))
    assert "'vicuna0'" in _err(exc) and "variant" in _err(exc)


def test_lora_checkpoint_with_llama2_variant(demo_dir):
    with pytest.raises(model.CheckpointError) as exc:
        model.load_minigpt4(**_kwargs(demo_dir, "llama2", projection=str(demo_dir["minigptv2"].projection)))
    msg = _err(exc)
    assert "LoRA" in msg and "minigptv2" in msg and "'llama2'" in msg


def test_minigptv2_without_lora(demo_dir):
    with pytest.raises(model.CheckpointError) as exc:
        model.load_minigpt4(**_kwargs(demo_dir, "minigptv2", projection=str(demo_dir["llama2"].projection)))
    assert "no LoRA weights" in _err(exc)


# ----------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize("which", ["vit", "qformer", "projection"])
def test_missing_file(demo_dir, tmp_path, which):
    ghost = tmp_path / "nope" / "weights.pth"
    with pytest.raises(model.CheckpointError) as exc:
        model.load_minigpt4(**_kwargs(demo_dir, **{which: str(ghost)}))
    assert "not found" in _err(exc) and str(ghost) in _err(exc)


@pytest.mark.parametrize("payload", [bytes(range(7, 256)) * 16, b"", b"<html><body>404</body></html>"])
def test_file_that_is_not_a_checkpoint(demo_dir, tmp_path, payload):
    junk = tmp_path / "eva_vit_g.pth"
    junk.write_bytes(payload)
    with pytest.raises(model.CheckpointError) as exc:
        model.load_minigpt4(**_kwargs(demo_dir, vit=str(junk)))
    assert "could not read" in _err(exc) and str(junk) in _err(exc)


def test_file_holding_non_tensors(demo_dir, tmp_path):
    odd = tmp_path / "pretrained_minigpt4.pth"
    torch.save({"model": {"llama_proj.weight": [1, 2, 3]}}, odd)
    with pytest.raises(model.CheckpointError, match="state dict of tensors"):
        model.load_minigpt4(**_kwargs(demo_dir, projection=str(odd)))


def _llm_copy(demo_dir, tmp_path, drop: str) -> Path:
    llm = tmp_path / "llm"
    shutil.copytree(demo_dir["vicuna0"].llm, llm)
    (llm / drop).unlink()
    return llm


def test_llm_dir_without_config(demo_dir, tmp_path):
    llm = _llm_copy(demo_dir, tmp_path, "config.json")
    with pytest.raises(model.CheckpointError) as exc:
        model.load_minigpt4(**_kwargs(demo_dir, llm=str(llm)))
    assert "config.json" in _err(exc) and str(llm) in _err(exc)


def test_llm_dir_without_weights(demo_dir, tmp_path):
    """Regression: transformers' OSError used to escape instead of a CheckpointError."""
    llm = _llm_copy(demo_dir, tmp_path, "model.safetensors")
    with pytest.raises(model.CheckpointError) as exc:
        model.load_minigpt4(**_kwargs(demo_dir, llm=str(llm)))
    assert str(llm) in _err(exc)


def test_llm_dir_without_tokenizer(demo_dir, tmp_path):
    """Regression: without tokenizer.model, transformers 5 silently builds an empty 3-token tokenizer
    (every prompt becomes just BOS) and the model used to load without any error."""
    llm = _llm_copy(demo_dir, tmp_path, "tokenizer.model")
    with pytest.raises(model.CheckpointError) as exc:
        model.load_minigpt4(**_kwargs(demo_dir, llm=str(llm)))
    assert "tokenizer" in _err(exc)


# ----------------------------------------------------------------------------- precision


def test_cuda_without_cuda(demo_dir):
    if torch.cuda.is_available():
        assert resolve_precision("cuda", "auto", "none") == (torch.device("cuda"), torch.float16)
    else:
        with pytest.raises(model.PrecisionError) as exc:
            model.load_minigpt4(**_kwargs(demo_dir, device="cuda"))
        assert "CUDA" in _err(exc) and 'device = "cpu"' in _err(exc)


def test_int8_on_cpu(demo_dir):
    with pytest.raises(model.PrecisionError) as exc:
        model.load_minigpt4(**_kwargs(demo_dir, device="cpu", quantization="int8"))
    assert "int8" in _err(exc) and "CUDA" in _err(exc)


@pytest.mark.parametrize("dtype", ["float64", "fp16", "half"])
def test_unknown_dtype(demo_dir, dtype):
    with pytest.raises(model.PrecisionError) as exc:
        model.load_minigpt4(**_kwargs(demo_dir, dtype=dtype))
    assert repr(dtype) in _err(exc) and "float32" in _err(exc)


def test_unknown_quantization_and_device(demo_dir):
    with pytest.raises(model.PrecisionError, match="quantization"):
        model.load_minigpt4(**_kwargs(demo_dir, quantization="int4"))
    with pytest.raises(model.PrecisionError, match="unknown device"):
        model.load_minigpt4(**_kwargs(demo_dir, device="tpu0"))


def test_auto_precision_on_cpu():
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "auto", "none") == (torch.device("cpu"), torch.float32)
    assert resolve_precision("cpu", "bfloat16", "none") == (torch.device("cpu"), torch.bfloat16)


# ----------------------------------------------------------------------------- configuration tables


def test_unknown_variant_and_dims(demo_dir):
    with pytest.raises(ValueError, match="unknown model variant"):
        model.load_minigpt4(**_kwargs(demo_dir, variant="vicuna13"))
    with pytest.raises(ValueError, match="patch_count"):
        model.load_minigpt4(**_kwargs(demo_dir, vision={"patch_count": 16}))
    with pytest.raises(ValueError, match="num_patches"):  # a derived size that disagrees with the others
        model.load_minigpt4(**_kwargs(demo_dir, vision={**demo_dir["vicuna0"].vision, "num_patches": 17}))
