"""``describe_weights`` on the tiny demo weights: parameter counts from the architecture's own formulas."""

from __future__ import annotations

import pytest
import torch

from model.report import WeightsReport, describe_weights


def vit_parameters(v) -> int:
    """EVA ViT as ``Blip2VisionModel`` (fused qkv with bias, no final norm): embeddings + blocks."""
    w, mlp, grid = v.width, v.mlp_hidden, v.img_size // v.patch_size
    embeddings = w + (1 + grid * grid) * w + 3 * v.patch_size**2 * w + w  # CLS, positions, patch conv
    block = (3 * w * w + 3 * w) + (w * w + w) + 2 * (2 * w) + (mlp * w + mlp) + (w * mlp + w)
    return embeddings + v.depth * block


def qformer_parameters(q) -> int:
    """Query tokens + the Q-Former's query side: self-attention, cross-attention every n-th layer, FFN."""
    h, i, enc = q.hidden, q.intermediate, q.encoder_width
    self_attention = 4 * (h * h + h) + 2 * h
    cross_attention = (h * h + h) + 2 * (enc * h + h) + (h * h + h) + 2 * h
    ffn = (i * h + i) + (h * i + h) + 2 * h
    cross_layers = len(range(0, q.layers, q.cross_attention_freq))
    return q.num_query_token * h + 2 * h + q.layers * (self_attention + ffn) + cross_layers * cross_attention


def llm_parameters(c, lora_rank: int | None, lora_modules: int) -> int:
    """LLaMA: embeddings, untied head, final norm, blocks; LoRA adds r·(in + out) per adapted projection."""
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    block = 4 * h * h + 3 * h * i + 2 * h
    lora = layers * lora_modules * lora_rank * 2 * h if lora_rank else 0
    head = 0 if c.tie_word_embeddings else c.vocab_size * h
    return c.vocab_size * h + head + h + layers * block + lora


@pytest.mark.parametrize("variant", ["vicuna0", "llama2", "minigptv2"])
def test_describe_weights_counts_every_part_exactly(demo_models, variant: str) -> None:
    m = demo_models[variant]
    spec, config = m.spec, m.llm.config
    report = describe_weights(m, context_tokens=2000)

    assert isinstance(report, WeightsReport)
    expected = {"vision encoder": vit_parameters(spec.vision), "ln_vision": 2 * spec.vision.width}
    if spec.has_qformer:
        expected["Q-Former"] = qformer_parameters(spec.qformer)
    hidden = config.hidden_size
    expected["projection"] = spec.projection_in_features * hidden + hidden
    lora_modules = len(spec.lora.target_modules) if spec.lora else 0
    expected["LLM"] = llm_parameters(config, m.load_report.lora_rank, lora_modules)

    assert [p.name for p in report.parts] == list(expected)  # data-flow order
    assert {p.name: p.parameters for p in report.parts} == expected
    assert sum(expected.values()) == sum(p.numel() for p in m.parameters())  # no parameter left out
    assert all(p.dtype == "float32" and p.bytes == 4 * p.parameters for p in report.parts)
    assert report.weights_bytes == 4 * sum(expected.values())


def test_the_tiny_vicuna0_numbers(demo_models) -> None:
    """The same counts written out once by hand, so a wrong formula above cannot hide a wrong report."""
    report = describe_weights(demo_models["vicuna0"], context_tokens=2000)
    counts = {p.name: p.parameters for p in report.parts}
    assert counts == {
        "vision encoder": 100_498,  # W=48, depth 2, MLP 209, 16×16 patches of 14 px
        "ln_vision": 96,
        "Q-Former": 39_696,  # 8 queries, hidden 32, 3 layers (cross-attention in 0 and 2), FFN 80
        "projection": 2_112,  # 32 → 64
        "LLM": 164_672,  # hidden 64, 2 layers, FFN 172, vocabulary 512, untied head
    }


def test_kv_cache_per_token_and_thread(demo_models) -> None:
    m = demo_models["vicuna0"]
    c = m.llm.config
    report = describe_weights(m, context_tokens=2000)
    head_dim = c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4  # K and V, fp32
    assert report.kv_bytes_per_token == per_token == 1024
    assert (report.context_tokens, report.kv_bytes_per_thread) == (2000, 2000 * per_token)
    assert describe_weights(m, context_tokens=10).kv_bytes_per_thread == 10 * per_token


def test_kv_cache_follows_grouped_query_attention_and_dtype(demo_models, monkeypatch) -> None:
    m = demo_models["vicuna0"]
    c = m.llm.config
    monkeypatch.setattr(c, "num_key_value_heads", 1)
    monkeypatch.setattr(type(m), "llm_dtype", property(lambda _self: torch.float16))
    head_dim = c.hidden_size // c.num_attention_heads
    assert describe_weights(m, 1).kv_bytes_per_token == 2 * c.num_hidden_layers * 1 * head_dim * 2


def test_part_lookup_and_load_report_is_declared(demo_models) -> None:
    m = demo_models["llama2"]
    report = describe_weights(m, 100)
    assert report.part("projection").parameters == 4 * m.spec.vision.width * 64 + 64
    with pytest.raises(KeyError):
        report.part("Q-Former")  # no Q-Former in the LLaMA-2 layout
    assert m.load_report is not None and m.load_report.variant == "llama2"
