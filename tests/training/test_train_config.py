"""``train.toml``: documented, validated, its defaults equal the code's; the ``train`` command end to end."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli.main import app
from bot.core.config import ModelSettings
from model.training.settings import (
    STAGE_RECIPES,
    TrainConfigError,
    TrainModelSettings,
    TrainSettings,
    load_train_config,
)
from tests.training.helpers import ROOT, read_log

runner = CliRunner()
PATHS = {"data", "prompts", "eval_data", "output_dir"}


def test_train_documented_train_toml_equals_code_defaults():
    documented = load_train_config(ROOT / "train.toml", check_paths=False)
    default = TrainSettings().resolved(documented.model.variant)
    for name in TrainSettings.model_fields:
        if name not in PATHS:
            assert getattr(documented.train, name) == getattr(default, name), name
    assert documented.train.output_dir == str(ROOT / default.output_dir)
    raw = tomllib.loads((ROOT / "train.toml").read_text())
    # `datasets` replaces `data` (both together are an error): it is documented as a commented example
    assert set(raw["train"]) | {"datasets"} == set(TrainSettings.model_fields), "every [train] setting is documented"
    for name in ("variant", "device", "dtype", "quantization", "vision", "qformer_dims"):
        assert getattr(documented.model, name) == getattr(TrainModelSettings(), name), name


def test_train_documented_dataset_mix_is_the_reference_stage1_recipe(tmp_path):
    """Uncommenting train.toml's `datasets = [...]` example in place of `data` gives LAION 115 : CC/SBU 14."""
    lines = (ROOT / "train.toml").read_text().splitlines()
    start = lines.index("# datasets = [")
    end = lines.index("# ]", start)
    example = [line.removeprefix("# ") for line in lines[start : end + 1]]
    edited = [line for line in lines[:start] if not line.startswith("data = ")] + example + lines[end + 1 :]
    (tmp_path / "train.toml").write_text("\n".join(edited) + "\n")
    config = load_train_config(tmp_path / "train.toml", check_paths=False)
    assert not config.train.data
    assert [(d.name, d.sample_ratio) for d in config.train.datasets] == [("laion", 115), ("cc_sbu", 14)]
    assert config.train.datasets[0].data == str(tmp_path / "laion/{00000..10488}.tar")
    assert all(d.batch_size == config.train.batch_size for d in config.train.datasets)


def test_train_model_table_mirrors_bot_toml():
    """``model/`` may not import ``bot/``: the [model] table is mirrored key for key, defaults included."""
    assert list(TrainModelSettings.model_fields) == list(ModelSettings.model_fields)
    for name, field in ModelSettings.model_fields.items():
        assert TrainModelSettings.model_fields[name].default == field.default, name
        assert TrainModelSettings.model_fields[name].annotation == field.annotation, name


def test_train_stage_recipes_are_the_reference_yaml():
    stage1 = TrainSettings(stage=1).resolved("vicuna0")
    assert (stage1.batch_size, stage1.init_lr, stage1.min_lr, stage1.warmup_lr) == (64, 1e-4, 8e-5, 1e-6)
    assert (stage1.warmup_steps, stage1.max_epoch, stage1.iters_per_epoch, stage1.total_steps) == (5000, 4, 5000, 20000)
    assert (stage1.end_sym, stage1.max_txt_len, stage1.prompt_template) == ("\n", 32, "")
    stage2 = TrainSettings().resolved("llama2")
    assert (stage2.batch_size, stage2.total_steps, stage2.checkpoint_every) == (12, 1000, 200)
    assert (stage2.end_sym, stage2.prompt_template) == ("</s>", "[INST] {} [/INST] ")
    assert STAGE_RECIPES[2]["max_txt_len"] == 160


def test_train_config_errors_are_all_reported(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('[model]\nvariant = "vicuna9"\n[train]\nstage = 3\nbatch_size = 0\ncolour = 1\n[extra]\nx = 1\n')
    with pytest.raises(TrainConfigError) as info:
        load_train_config(path)
    message = str(info.value)
    assert str(path) in message and "5 invalid setting(s)" in message
    for where in (
        "model.variant",
        "train.stage",
        "train.batch_size",
        "train.colour: unknown setting",
        "extra: unknown setting",
    ):
        assert where in message
    path.write_text('[model]\nquantization = "int8"\n')
    with pytest.raises(TrainConfigError, match="quantization"):
        load_train_config(path)


def test_train_cli_trains_and_resumes_without_the_config(make_config):
    config = make_config(max_steps=1)
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    out = config.parent / "out"
    assert "Trained 1 steps" in text and "checkpoint_last.pth" in text
    saved = json.loads((out / "train_config.json").read_text())
    saved["train"]["max_steps"] = 2
    (out / "train_config.json").write_text(json.dumps(saved))
    again = runner.invoke(app, ["train", "--resume", str(out)])
    assert again.exit_code == 0, again.output
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_train_cli_bad_config_exits_2_naming_the_file(tmp_path: Path):
    path = tmp_path / "train.toml"
    path.write_text("[train]\nbogus = 1\n")
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2
    assert "train.toml" in result.output and "train.bogus" in " ".join(result.output.split())
