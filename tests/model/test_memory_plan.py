"""The memory plan (``model.memory``): what the weights will take, the ``dtype = "auto"`` rule on CPU,
and ``weights check`` refusing early with numbers."""

from __future__ import annotations

import logging

import pytest
import torch
from typer.testing import CliRunner

import model.memory as memory
from bot.cli.main import app
from model import load_minigpt4
from model.demo_weights import write_demo_weights
from model.memory import plan_memory
from model.report import describe_weights
from model.variants import get_variant
from tests.demo_helpers import shape_lines

runner = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    return {v: write_demo_weights(folder, v) for v in ("vicuna0", "minigptv2")}


@pytest.mark.parametrize("variant", ["vicuna0", "minigptv2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_equals_what_the_loader_loads(demo, variant, dtype):
    """Computed from config.json and the variant only, the plan gives each part's exact bytes (LoRA aside)."""
    kwargs = demo[variant].loader_kwargs()
    spec = get_variant(variant).with_dims(kwargs["vision"], kwargs["qformer_dims"])
    plan = plan_memory(spec, kwargs["llm"], torch.device("cpu"), dtype, context_tokens=100)
    loaded = describe_weights(load_minigpt4(**kwargs, dtype=str(dtype).removeprefix("torch.")), context_tokens=100)
    lora = sum(p.numel() * p.element_size() for n, p in loaded_model_params(kwargs, dtype) if "lora_" in n)
    assert {p.name: p.bytes for p in plan.parts} == {
        p.name: p.bytes - (lora if p.name == "LLM" else 0) for p in loaded.parts
    }
    assert plan.kv_bytes == loaded.kv_bytes_per_thread


def loaded_model_params(kwargs, dtype):
    return load_minigpt4(**kwargs, dtype=str(dtype).removeprefix("torch.")).llm.named_parameters()


def test_real_7b_plan_in_float32_is_more_than_a_24_gb_machine(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ).save_pretrained(tmp_path)
    fp32 = plan_memory(get_variant("vicuna0"), tmp_path, torch.device("cpu"), torch.float32)
    bf16 = plan_memory(get_variant("vicuna0"), tmp_path, torch.device("cpu"), torch.bfloat16)
    assert 28 * 2**30 < fp32.weights_bytes < 30 * 2**30  # ≈ 7.8 B parameters: LLaMA 6.7 B, ViT-g 1.0 B
    assert 14 * 2**30 < bf16.weights_bytes < 16 * 2**30  # Q-Former and projection stay float32


def test_auto_dtype_on_cpu_picks_bfloat16_when_float32_does_not_fit(demo, monkeypatch, caplog):
    kwargs = demo["vicuna0"].loader_kwargs()
    assert load_minigpt4(**kwargs, dtype="auto").llm_dtype == torch.float32  # fits: exact float32
    monkeypatch.setattr(memory, "available_memory", lambda _device: 2**20)  # a 1 MiB machine
    with caplog.at_level(logging.INFO, logger="model.memory"):
        m = load_minigpt4(**kwargs, dtype="auto")
    assert m.llm_dtype == torch.bfloat16 and m.vision_dtype == torch.bfloat16
    assert m.load_report.dtype == "bfloat16"
    assert "float32 would not fit" in caplog.text and "1.00 MiB available" in caplog.text


def test_weights_check_refuses_early_with_numbers(demo, tmp_path, monkeypatch):
    d = demo["vicuna0"]
    config = tmp_path / "bot.toml"
    config.write_text(
        f'data_dir = "{tmp_path}"\n[model]\ndevice = "cpu"\ndtype = "float32"\nllm = "{d.llm}"\nvit = "{d.vit}"\n'
        f'qformer = "{d.qformer}"\nprojection = "{d.projection}"\n' + shape_lines(d)
    )
    ok = runner.invoke(app, ["weights", "check", "-c", str(config), "--max-new-tokens", "2"])
    assert ok.exit_code == 0, ok.output
    assert "memory:" in ok.output and "float32" in ok.output and "available" in ok.output
    loads = []
    monkeypatch.setattr(memory, "available_memory", lambda _device: 2**20)
    monkeypatch.setattr("bot.cli.main._load_model", lambda *a: loads.append(a))
    refused = runner.invoke(app, ["weights", "check", "-c", str(config)])
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1 and not loads
    assert "will not fit" in text and "1.00 MiB is available" in text and "on cpu in float32" in text
