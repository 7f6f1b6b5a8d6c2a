"""The three published checkpoint layouts, through the same loader real weights use (tiny demo files)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from model.checkpoints import interpolate_pos_embed

VARIANTS = ("vicuna0", "llama2", "minigptv2")
# demo sizes: 224 px / 14 → 16×16 patches; v2 runs at 448 px → 32×32
VISUAL_TOKENS = {"vicuna0": 8, "llama2": 64, "minigptv2": 256}


def _vit_file(demo_dir, variant):
    return torch.load(demo_dir[variant].vit, map_location="cpu", weights_only=True)


def _proj_file(demo_dir, variant):
    return torch.load(demo_dir[variant].projection, map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_visual_token_count(demo_models, variant):
    m = demo_models[variant]
    size = m.spec.vision.img_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = m.encode_images(pixels)
    assert tuple(tokens.shape) == (2, VISUAL_TOKENS[variant], 64)
    assert m.spec.num_visual_tokens == VISUAL_TOKENS[variant]
    assert torch.isfinite(tokens).all()
    # different images give different tokens (nothing is left at a constant init)
    assert not torch.allclose(tokens[0], tokens[1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_vit_fp16_file_values_load_exactly_as_fp32(demo_models, demo_dir, variant):
    m = demo_models[variant]
    sd = _vit_file(demo_dir, variant)
    assert sd["patch_embed.proj.weight"].dtype == torch.float16
    enc = m.visual_encoder
    pairs = {
        "cls_token": enc.embeddings.class_embedding,
        "patch_embed.proj.weight": enc.embeddings.patch_embedding.weight,
        "patch_embed.proj.bias": enc.embeddings.patch_embedding.bias,
        "blocks.0.norm1.weight": enc.encoder.layers[0].layer_norm1.weight,
        "blocks.0.attn.qkv.weight": enc.encoder.layers[0].self_attn.qkv.weight,
        "blocks.0.attn.proj.weight": enc.encoder.layers[0].self_attn.projection.weight,
        "blocks.1.norm2.bias": enc.encoder.layers[1].layer_norm2.bias,
        "blocks.1.mlp.fc1.weight": enc.encoder.layers[1].mlp.fc1.weight,
        "blocks.1.mlp.fc2.bias": enc.encoder.layers[1].mlp.fc2.bias,
    }
    for key, param in pairs.items():
        assert param.dtype == torch.float32, key
        assert torch.equal(param, sd[key].float()), key


@pytest.mark.parametrize("variant", VARIANTS)
def test_qkv_bias_is_q_zero_v(demo_models, demo_dir, variant):
    m = demo_models[variant]
    sd = _vit_file(demo_dir, variant)
    for i in range(2):
        bias = m.visual_encoder.encoder.layers[i].self_attn.qkv.bias
        q, v = sd[f"blocks.{i}.attn.q_bias"].float(), sd[f"blocks.{i}.attn.v_bias"].float()
        assert torch.equal(bias, torch.cat([q, torch.zeros_like(q), v]))
        assert q.abs().sum() > 0 and v.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_extra_vit_block_is_ignored(demo_models, demo_dir, variant):
    m = demo_models[variant]
    sd = _vit_file(demo_dir, variant)
    extra = sorted(k for k in sd if k.startswith("blocks.2."))
    assert len(extra) == 13  # the whole block is in the file (the real file's 40th)
    vit_report = next(r for r in m.load_report.files if r.role == "vision encoder")
    assert sorted(k for k in vit_report.ignored if k.startswith("blocks.")) == extra
    assert not vit_report.unexpected
    assert len(m.visual_encoder.encoder.layers) == 2


@pytest.mark.parametrize("variant", ["vicuna0", "llama2"])
def test_224px_variants_keep_pos_embed(demo_models, demo_dir, variant):
    m = demo_models[variant]
    pos = _vit_file(demo_dir, variant)["pos_embed"].float()
    assert torch.equal(m.visual_encoder.embeddings.position_embedding, pos)


def test_minigptv2_pos_embed_interpolated_16_to_32(demo_models, demo_dir):
    m = demo_models["minigptv2"]
    pos = _vit_file(demo_dir, "minigptv2")["pos_embed"]
    assert tuple(pos.shape) == (1, 1 + 16 * 16, 48)
    loaded = m.visual_encoder.embeddings.position_embedding
    assert tuple(loaded.shape) == (1, 1 + 32 * 32, 48)
    assert m.spec.vision.grid == 32
    torch.testing.assert_close(loaded, interpolate_pos_embed(pos, 32), atol=0, rtol=0)
    # the LAVIS recipe written out: CLS kept, patch grid bicubic-resized in fp32, align_corners=False
    p = pos.float()
    grid = p[:, 1:].reshape(1, 16, 16, 48).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False)
    by_hand = torch.cat([p[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    torch.testing.assert_close(loaded, by_hand, atol=1e-6, rtol=0)


def test_interpolate_pos_embed_same_grid_is_identity():
    pos = torch.randn(1, 1 + 9, 4)
    assert torch.equal(interpolate_pos_embed(pos, 3), pos)


@pytest.mark.parametrize(("layer", "proj"), [(0, "q_proj"), (1, "v_proj")])
def test_minigptv2_lora_applied_with_alpha_16(demo_models, demo_dir, layer, proj):
    m = demo_models["minigptv2"]
    sd = _proj_file(demo_dir, "minigptv2")
    prefix = f"llama_model.base_model.model.model.layers.{layer}.self_attn.{proj}"
    a, b = sd[f"{prefix}.lora_A.weight"].float(), sd[f"{prefix}.lora_B.weight"].float()
    r = a.shape[0]
    assert m.load_report.lora_rank == r == 8
    base = load_file(str(demo_dir["minigptv2"].llm / "model.safetensors"))
    w = base[f"model.layers.{layer}.self_attn.{proj}.weight"].float()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    module = getattr(m.llm.model.layers[layer].self_attn, proj)
    with torch.inference_mode():
        out = module(x)
    expected = x @ w.T + (16 / r) * (x @ a.T @ b.T)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(out, x @ w.T, atol=1e-3)


def test_minigptv2_lora_only_on_q_and_v(demo_models, demo_dir):
    m = demo_models["minigptv2"]
    base = load_file(str(demo_dir["minigptv2"].llm / "model.safetensors"))
    attn = m.llm.model.layers[0].self_attn
    assert torch.equal(attn.k_proj.weight, base["model.layers.0.self_attn.k_proj.weight"].float())
    assert not hasattr(attn.k_proj, "lora_A")
    assert hasattr(attn.q_proj, "lora_A") and hasattr(attn.v_proj, "lora_A")


def test_minigptv2_lora_changes_logits(demo_models, demo_dir):
    m = demo_models["minigptv2"]
    plain = LlamaForCausalLM.from_pretrained(demo_dir["minigptv2"].llm, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 30, 40, 50, 60, 70]])
    with torch.inference_mode():
        with_lora = m.llm(input_ids=ids).logits
        without = plain(input_ids=ids).logits
    assert (with_lora - without).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["vicuna0", "llama2"])
def test_no_lora_on_minigpt4_variants(demo_models, variant):
    m = demo_models[variant]
    assert m.load_report.lora_rank is None
    assert not any(".lora_" in k for k in m.llm.state_dict())


def test_vicuna0_ln_vision_and_queries_from_blip2_file(demo_models, demo_dir):
    m = demo_models["vicuna0"]
    sd = torch.load(demo_dir["vicuna0"].qformer, map_location="cpu", weights_only=True)["model"]
    assert torch.equal(m.ln_vision.weight, sd["ln_vision.weight"])
    assert torch.equal(m.ln_vision.bias, sd["ln_vision.bias"])
    assert torch.equal(m.query_tokens, sd["query_tokens"])
    q_report = next(r for r in m.load_report.files if r.role == "Q-Former")
    assert {"t5_proj.weight", "t5_proj.bias", "Qformer.bert.embeddings.position_ids"} <= set(q_report.ignored)


@pytest.mark.parametrize("variant", ["llama2", "minigptv2"])
def test_no_qformer_variants_keep_default_ln_vision(demo_models, variant):
    ln = demo_models[variant].ln_vision
    assert torch.equal(ln.weight, torch.ones(48)) and torch.equal(ln.bias, torch.zeros(48))


@pytest.mark.parametrize("variant", VARIANTS)
def test_projection_loaded_from_stage2_file(demo_models, demo_dir, variant):
    m = demo_models[variant]
    sd = _proj_file(demo_dir, variant)
    assert torch.equal(m.llama_proj.weight, sd["llama_proj.weight"])
    assert torch.equal(m.llama_proj.bias, sd["llama_proj.bias"])
    proj_report = m.load_report.files[-1]
    assert proj_report.role == "projection" and not proj_report.unexpected
