"""``minigpt4-bot weights export``: the folder vLLM loads, its coverage check, tokenizer and chat template.

These run in the bot's environment only (no vLLM): the export is the bot side of the plugin.  That vLLM
really loads and runs the folders is tests/vllm/test_model.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bot.cli.main import app
from model.checkpoints import CheckpointError
from model.conversation import TEMPLATES, build_prompt
from model.demo_weights import DemoSizes, write_demo_weights
from model.vllm_plugin.configuration import MiniGPT4Config, expected_shapes
from model.vllm_plugin.export import MANIFEST, _save_shards, chat_template, check_export, export_model

ROOT = Path(__file__).resolve().parents[2]

VARIANTS = ("vicuna0", "llama2", "minigptv2")
THREAD: list[dict[str, Any]] = [
    {"role": "user", "text": "What is it?", "image": True},
    {"role": "assistant", "text": "A red circle."},
    {"role": "user", "text": "And this one?", "image": True},
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    folder = tmp_path_factory.mktemp("export")
    out = {}
    for variant in VARIANTS:
        weights = write_demo_weights(folder / variant, variant)
        export_model(folder / f"{variant}-vllm", **weights.loader_kwargs())
        out[variant] = (weights, folder / f"{variant}-vllm")
    return out


def test_demo_weights_have_a_head_dim_vllm_cpu_attention_takes() -> None:
    sizes = DemoSizes()
    assert sizes.llm_hidden // sizes.llm_heads >= 32  # vLLM's CPU attention refuses head_dim 16


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_writes_the_folder_vllm_loads(exports: dict[str, tuple[Any, Path]], variant: str) -> None:
    from model.variants import get_variant

    weights, folder = exports[variant]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MiniGPT4ForConditionalGeneration"] and config["model_type"] == "minigpt4"
    spec = get_variant(variant)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["variant"] == variant and manifest["template"] == spec.template.name
    assert manifest["image_token_id"] == config["image_token_id"] == 512  # the demo LLM's vocabulary size
    assert manifest["num_image_tokens"] == config["num_image_tokens"] == {"vicuna0": 8, "llama2": 64}.get(variant, 256)
    assert set(manifest["sources"]) == ({"llm", "vit", "projection"} | ({"qformer"} if spec.has_qformer else set()))
    assert len(manifest["sources"]["vit"]["sha256"]) == 64
    assert manifest["ignored"][str(weights.vit)]  # the 40th-block stand-in the reference drops too
    assert check_export(folder).variant == variant
    state = load_file(folder / "model.safetensors")
    assert set(state) == set(expected_shapes(MiniGPT4Config.from_json_file(folder / "config.json")))


def test_export_keeps_the_local_engines_numbers(exports: dict[str, tuple[Any, Path]]) -> None:
    """fp16 files stay fp16 where that is exact; the 448-px interpolated position embedding and the merged
    LoRA projections stay float32; the merged weight is W + alpha/r · B·A."""
    from model.checkpoints import read_state_dict
    from model.loader import load_minigpt4

    weights, folder = exports["minigptv2"]
    state = load_file(folder / "model.safetensors")
    assert state["language_model.model.layers.0.self_attn.k_proj.weight"].dtype == torch.float16
    assert state["vision_model.embeddings.position_embedding"].dtype == torch.float32
    assert state["vision_model.embeddings.position_embedding"].shape == (1, 1 + 32 * 32, 48)
    merged = state["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert merged.dtype == torch.float32
    model = load_minigpt4(**weights.loader_kwargs())
    base = model.llm.model.layers[0].self_attn.q_proj.base_layer.weight
    lora = read_state_dict(weights.projection, "projection", wrapper_key="model")
    prefix = "llama_model.base_model.model.model.layers.0.self_attn.q_proj"
    a, b = lora[f"{prefix}.lora_A.weight"].float(), lora[f"{prefix}.lora_B.weight"].float()
    torch.testing.assert_close(merged, base + (16 / a.shape[0]) * b @ a)
    assert not torch.equal(merged, base)


def test_export_rejects_a_projection_of_another_variant(tmp_path: Path) -> None:
    vicuna = write_demo_weights(tmp_path / "v0", "vicuna0")
    llama2 = write_demo_weights(tmp_path / "l2", "llama2")
    with pytest.raises(CheckpointError, match=r"does not fit the projection[\s\S]*check \[model\]\.variant"):
        export_model(tmp_path / "out", **(llama2.loader_kwargs() | {"projection": str(vicuna.projection)}))
    assert not (tmp_path / "out").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="is not an earlier export"):
        export_model(tmp_path / "notes", **vicuna.loader_kwargs())
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_coverage_check_rejects_a_mismatched_model_file(exports: dict[str, tuple[Any, Path]], tmp_path: Path) -> None:
    """A model.safetensors that lacks a tensor, holds an extra one, or has a wrong shape is refused by name."""
    _weights, folder = exports["vicuna0"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    del state["qformer.encoder.layer.0.crossattention.attention.key.weight"]
    state["t5_proj.weight"] = torch.zeros(2, 2)
    state["llama_proj.weight"] = torch.zeros(64, 48)
    save_file(state, broken / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        check_export(broken)
    message = str(info.value)
    assert "missing 1 tensor(s): qformer.encoder.layer.0.crossattention.attention.key.weight" in message
    assert "t5_proj.weight" in message and "no place for" in message
    assert "llama_proj.weight: has (64, 48), the model needs (64, 32)" in message
    assert "re-run minigpt4-bot weights export" in message


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer_and_chat_template_give_the_backends_token_ids(
    exports: dict[str, tuple[Any, Path]], variant: str
) -> None:
    """For `vllm serve DIR`: the chat template renders the reference prompt, and tokenising that text whole
    gives exactly the ids the bot's backend sends (segments, one <ImageHere> id between them)."""
    from transformers import AutoTokenizer

    from model.text import TextCodec

    weights, folder = exports[variant]
    tokenizer = AutoTokenizer.from_pretrained(folder)  # as vLLM loads it: no arguments
    assert tokenizer.convert_tokens_to_ids("<ImageHere>") == 512
    template = TEMPLATES[variant]
    prompt = build_prompt(template, THREAD)
    original = TextCodec.from_dir(weights.llm).segment_token_ids(prompt)
    assert TextCodec.from_dir(folder).segment_token_ids(prompt) == original
    contract = list(original[0])
    for segment in original[1:]:
        contract += [512, *segment]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "<ImageHere>\nAnd this one?"},  # vLLM's "string" content format
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == tokenizer.bos_token + prompt
    assert (folder / "chat_template.jinja").read_text() == chat_template(template)
    assert tokenizer(text, add_special_tokens=False).input_ids == contract


def test_the_bot_reads_an_exported_folders_tokenizer_without_a_config_warning(
    exports: dict[str, tuple[Any, Path]],
) -> None:
    """The vllm backend tokenises with the exported folder in the bot's process, where transformers does not know
    ``model_type = "minigpt4"`` unless it is registered: it warned "a model of type minigpt4 … of type ``"."""
    _, folder = exports["vicuna0"]
    code = "import sys; from model.text import TextCodec; print(TextCodec.from_dir(sys.argv[1]).eos_id)"
    out = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert out.stdout.strip() == "2"
    assert "model of type" not in out.stderr, out.stderr


def test_weights_export_command(tmp_path: Path) -> None:
    config = tmp_path / "bot.toml"
    config.write_text('data_dir = "state"\n[model]\nvariant = "llama2"\n')
    result = CliRunner().invoke(app, ["weights", "export", "--out", str(tmp_path / "out"), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "llama2" in result.output and "64 tokens per picture" in result.output
    assert check_export(tmp_path / "out").variant == "llama2"
    missing = tmp_path / "missing.toml"
    missing.write_text(
        config.read_text() + f'llm = "{tmp_path}"\nvit = "{tmp_path}/eva_vit_g.pth"\nprojection = "x.pth"\n'
    )
    broken = CliRunner().invoke(app, ["weights", "export", "--out", str(tmp_path / "x"), "--config", str(missing)])
    assert broken.exit_code == 1
    assert "Cannot export the model" in broken.output and not (tmp_path / "x").exists()


def test_a_big_export_is_written_in_shards_with_an_index(exports: dict[str, tuple[Any, Path]], tmp_path: Path) -> None:
    _weights, folder = exports["llama2"]
    state = load_file(folder / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _save_shards(state, tmp_path, shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    assert set(index["weight_map"]) == set(state)
    assert check_export(tmp_path).variant == "llama2"
