"""The operator commands, driven through typer's runner against real (tiny) weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bot.cli.main import app
from model import load_minigpt4

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "tests" / "fixtures" / "parity"
runner = CliRunner()


def _text(result) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> Path:
    """A bot.toml with no weights configured: the CLI writes and loads demo weights."""
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "bot.toml"
    path.write_text('data_dir = "state"\n[model]\ndevice = "cpu"\n')
    return path


@pytest.fixture(scope="module")
def parity_config(tmp_path_factory) -> Path:
    cfg = json.loads((PARITY / "config.json").read_text())
    vision = "\n".join(
        f"{k} = {cfg['vit'][k]}" for k in ("img_size", "patch_size", "width", "depth", "heads", "mlp_hidden")
    )
    qformer = "\n".join(
        f"{k} = {cfg['qformer'][k]}"
        for k in (
            "hidden",
            "layers",
            "heads",
            "intermediate",
            "cross_attention_freq",
            "num_query_token",
            "encoder_width",
        )
    )
    path = tmp_path_factory.mktemp("parity") / "bot.toml"
    path.write_text(
        f'[model]\nvariant = "vicuna0"\nllm = "{PARITY / "llama"}"\nvit = "{PARITY / "eva_vit_g.pth"}"\n'
        f'qformer = "{PARITY / "blip2_pretrained_flant5xxl.pth"}"\n'
        f'projection = "{PARITY / "pretrained_minigpt4.pth"}"\n'
        f'device = "cpu"\ndtype = "float32"\n[model.vision]\n{vision}\n[model.qformer_dims]\n{qformer}\n'
    )
    return path


def test_ask_json_matches_the_model_api(parity_config):
    image = PARITY / "images" / "shapes_64x64.png"
    result = runner.invoke(
        app,
        [
            "ask",
            str(image),
            "What can I cook with this?",
            "--config",
            str(parity_config),
            "--json",
            "--greedy",
            "--max-new-tokens",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(doc) == {"prompt", "token_ids", "text"}
    expected = json.loads((PARITY / "expected" / "expected.json").read_text())["vicuna0_single"]
    assert doc["prompt"] == expected["prompt"]
    # The CLI uses the bot's defaults (repetition penalty 1.05), which give the same 8 ids here.
    assert doc["token_ids"] == expected["greedy_ids_repetition_penalty_1.05"]
    assert isinstance(doc["text"], str)


def test_ask_streams_text_on_demo_weights(demo_config, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 0, 0)).save(image)
    result = runner.invoke(
        app, ["ask", str(image), "What is this?", "-c", str(demo_config), "--greedy", "--max-new-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    assert "demo weights" in _text(result)
    assert (demo_config.parent / "state" / "demo-weights" / "vicuna0" / "eva_vit_g.pth").is_file()


def test_ask_rejects_a_file_that_is_not_an_image(demo_config, tmp_path):
    page = tmp_path / "photo.jpg"
    page.write_text("<!DOCTYPE html><html><body>Sign in to Slack</body></html>")
    result = runner.invoke(app, ["ask", str(page), "What is this?", "-c", str(demo_config)])
    assert result.exit_code == 2
    assert "not a picture I can read" in _text(result)
    assert "not in an image format" in _text(result)


def test_ask_rejects_invalid_generation_options(demo_config, tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 20)).save(image)
    result = runner.invoke(app, ["ask", str(image), "hi", "-c", str(demo_config), "--temperature", "0"])
    assert result.exit_code == 2
    assert "temperature" in _text(result)


def test_weights_check_reports_and_answers(parity_config):
    result = runner.invoke(app, ["weights", "check", "-c", str(parity_config), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    out = _text(result)
    for text in ("vicuna0", "vision encoder", "Q-Former", "projection", "KV cache", "test image answer", "weights OK"):
        assert text in out
    assert "28" in out and "73" in out  # tensors loaded from the ViT and BLIP-2 files


def test_weights_check_explains_a_mismatched_projection(parity_config, tmp_path):
    config = tmp_path / "bot.toml"
    text = parity_config.read_text().replace("pretrained_minigpt4.pth", "pretrained_minigpt4_llama2.pth")
    config.write_text(text)
    result = runner.invoke(app, ["weights", "check", "-c", str(config)])
    assert result.exit_code == 1
    assert "pretrained_minigpt4_llama2.pth" in _text(result)
    assert "192" in _text(result) and "32" in _text(result)


def test_bad_config_exits_with_the_field_name(tmp_path):
    config = tmp_path / "bot.toml"
    config.write_text('[model]\ndtype = "float64"\n')
    result = runner.invoke(app, ["weights", "check", "-c", str(config)])
    assert result.exit_code == 2
    assert "model.dtype" in _text(result)


def test_int8_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: int8 can run (gpu)")
    config = tmp_path / "bot.toml"
    config.write_text('data_dir = "state"\n[model]\ndevice = "cpu"\nquantization = "int8"\n')
    result = runner.invoke(app, ["weights", "check", "-c", str(config)])
    assert result.exit_code == 1
    assert "needs a CUDA GPU" in _text(result)


@pytest.mark.parametrize("variant", ["llama2", "minigptv2"])
def test_weights_demo_writes_loadable_files(tmp_path, variant):
    result = runner.invoke(app, ["weights", "demo", "--out", str(tmp_path), "--variant", variant])
    assert result.exit_code == 0, result.output
    import tomllib

    table = tomllib.loads(result.stdout)  # the [model] table's keys (bot.toml already has the table)
    assert table["variant"] == variant
    m = load_minigpt4(
        variant=variant, llm=table["llm"], vit=table["vit"], projection=table["projection"], vision=table["vision"]
    )
    assert m.spec.num_visual_tokens == (64 if variant == "llama2" else 256)
    assert "nonsense" in _text(result)


# ---------------------------------------------------------------------------- messages are printed literally


def _flat(result) -> str:
    """Output with every space and line break removed: rich folds a long path anywhere, even mid-word."""
    return "".join(result.output.split())


def test_config_errors_are_printed_literally(tmp_path):
    """rich would read ``[model]`` as a style and drop it, and raise on ``[/INST]``; neither may happen."""
    folder = tmp_path / "[model]"
    folder.mkdir()
    config = folder / "bot.toml"
    config.write_text('[model]\ndtype = "[/INST]"\n')
    result = runner.invoke(app, ["weights", "check", "-c", str(config)])
    assert result.exit_code == 2, result.output
    assert "[model]/bot.toml:1invalidsetting(s)" in _flat(result)
    assert "model.dtype" in _text(result) and "(got '[/INST]')" in _text(result)


def test_load_errors_keep_the_table_names_they_quote(tmp_path):
    missing = tmp_path / "[" / "INST]"  # the path reads .../[/INST]/llama
    config = tmp_path / "bot.toml"
    config.write_text(
        f'[model]\nvariant = "vicuna0"\nllm = "{missing / "llama"}"\nvit = "{PARITY / "eva_vit_g.pth"}"\n'
        f'qformer = "{PARITY / "blip2_pretrained_flant5xxl.pth"}"\n'
        f'projection = "{PARITY / "pretrained_minigpt4.pth"}"\ndevice = "cpu"\n'
    )
    result = runner.invoke(app, ["weights", "check", "-c", str(config)])
    assert result.exit_code == 1, result.output
    assert "Cannot load the model" in _text(result)
    assert "[/INST]/llama" in _flat(result)
    assert "point [model].llm at a Hugging Face" in _text(result)

    config.write_text(
        config.read_text()
        .replace(str(missing / "llama"), str(PARITY / "llama"))
        .replace(str(PARITY / "eva_vit_g.pth"), str(missing / "vit.pth"))
    )
    result = runner.invoke(app, ["weights", "check", "-c", str(config)])
    assert result.exit_code == 1, result.output
    assert "[/INST]/vit.pth" in _flat(result) and "(check the [model] section of bot.toml)" in _text(result)


def test_ask_prints_paths_and_errors_literally(demo_config, tmp_path):
    folder = tmp_path / "[model]" / "["
    folder.mkdir(parents=True)
    missing = runner.invoke(app, ["ask", str(folder / "INST]-nothing.png"), "hi", "-c", str(demo_config)])
    assert missing.exit_code == 2, missing.output
    assert "[model]/[/INST]-nothing.png" in _flat(missing)

    page = folder / "INST].jpg"
    page.write_text("[/INST] is not a picture")
    result = runner.invoke(app, ["ask", str(page), "[/INST] what is [model]?", "-c", str(demo_config)])
    assert result.exit_code == 2, result.output
    assert "[model]/[/INST].jpgisnotapictureIcanread" in _flat(result)


def test_weights_demo_sets_the_shipped_bot_toml_and_they_stay_demo_weights(tmp_path):
    """`weights demo --write-config` edits the shipped bot.toml's [model] table in place; the weights it
    points at are still reported as demo weights (``weights check``), not as real ones."""
    from bot.cli.backends import demo_weights_in_use
    from bot.core.config import load_settings

    config = tmp_path / "bot.toml"
    config.write_text((ROOT / "bot.toml").read_text())
    args = ["weights", "demo", "--out", str(tmp_path / "w"), "--variant", "llama2", "--write-config", str(config)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    settings = load_settings(config)
    assert settings.model.variant == "llama2" and Path(settings.model.llm).is_dir()
    assert not settings.model.uses_demo_weights and demo_weights_in_use(settings)
    assert "# LAVIS eva_vit_g.pth" not in config.read_text()  # the key's line was replaced …
    assert "# Which MiniGPT-4 to run" in config.read_text()  # … and the comments around it kept
    config.write_text(config.read_text().replace('device = "auto"', 'device = "cpu"', 1))
    check = runner.invoke(app, ["weights", "check", "--config", str(config), "--max-new-tokens", "2"])
    assert check.exit_code == 0, check.output
    assert "demo weights" in _text(check)
