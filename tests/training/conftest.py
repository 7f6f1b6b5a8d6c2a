"""Fixtures for the training tests: the parity ``[model]`` table, ``train.toml`` writer, a quiet runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.training.helpers import ANSWERS, PARITY, PROMPT, write_pairs, write_toml


@pytest.fixture(scope="session")
def parity_model_table(parity_vision: dict[str, Any], parity_qformer_dims: dict[str, Any]) -> dict[str, Any]:
    return {
        "variant": "vicuna0",
        "llm": str(PARITY / "llama"),
        "vit": str(PARITY / "eva_vit_g.pth"),
        "qformer": str(PARITY / "blip2_pretrained_flant5xxl.pth"),
        "projection": str(PARITY / "pretrained_minigpt4.pth"),
        "device": "cpu",
        "dtype": "float32",
        "vision": parity_vision,
        "qformer_dims": parity_qformer_dims,
    }


@pytest.fixture
def make_config(tmp_path: Path, parity_model_table: dict[str, Any]):
    """``make_config(folder=None, model=None, **train)`` → a ``train.toml`` on the parity weights and pairs."""

    def make(folder: Path | None = None, model: dict[str, Any] | None = None, **train: Any) -> Path:
        folder = folder or tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        if "data" not in train and "datasets" not in train:
            train["data"] = str(
                write_pairs(folder, [("shapes_64x64.png", ANSWERS[0]), ("stripes_80x48.png", ANSWERS[1])])
            )
        if train.get("stage", 2) == 2 and "prompts" not in train:
            (folder / "prompts.txt").write_text(PROMPT + "\n")
            train["prompts"] = "prompts.txt"
        values = {"batch_size": 2, "shuffle": False, "num_workers": 0, "max_steps": 2, "output_dir": "out"} | train
        return write_toml(folder / "train.toml", {"model": model or parity_model_table, "train": values})

    return make


@pytest.fixture
def train_run():
    """``train_run(config_path, **kwargs)`` → ``TrainResult`` (no progress bar)."""
    from model.training.loop import run_training
    from model.training.settings import load_train_config

    def run(path: Path, **kwargs: Any):
        return run_training(load_train_config(path), progress=False, **kwargs)

    return run
