"""``minigpt4-bot train --resume DIR`` from another folder: train_config.json must not depend on the cwd."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from bot.cli.main import app
from tests.training.helpers import ANSWERS, write_pairs

runner = CliRunner()


def test_resume_works_from_another_folder_with_a_relative_config(make_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    write_pairs(run, [("shapes_64x64.png", ANSWERS[0]), ("stripes_80x48.png", ANSWERS[1])])
    make_config(run, data="data.jsonl", max_steps=2)  # relative data, prompts and output_dir
    monkeypatch.chdir(run)
    first = runner.invoke(app, ["train", "--config", "train.toml"])
    assert first.exit_code == 0, first.output
    assert "Loading weights" not in first.stderr and "it/s" not in first.stderr  # no transformers progress bars
    saved = json.loads((run / "out" / "train_config.json").read_text())
    for path in (saved["train"]["data"], saved["train"]["prompts"], saved["train"]["output_dir"]):
        assert Path(path).is_absolute(), saved["train"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    second = runner.invoke(app, ["train", "--resume", str(run / "out")])
    assert second.exit_code == 0, second.output
    assert "Trained 2 steps" in " ".join(second.output.split())
