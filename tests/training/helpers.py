"""Helpers for the training tests: tiny data sets, ``train.toml`` files, reading ``log.jsonl``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PARITY = ROOT / "tests" / "fixtures" / "parity"
TRAIN_FIXTURES = PARITY / "train"
PROMPT = "<Img><ImageHere></Img> Describe this image in detail."
# The reference stage-2 batch (../shared/parity/train): [shapes, stripes] with these answers.
ANSWERS = json.loads((TRAIN_FIXTURES / "expected.json").read_text())["stage2"]["answers_raw"]
EXTRA = [
    ("stripes_80x48.png", "Stripes, blue then yellow, across the picture."),
    ("shapes_64x64.png", "A circle and a square, nothing else!"),
]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (inside a list: [[table]] entries written in place)
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_toml(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for table, values in tables.items():
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines.append(f"[{table}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if not isinstance(v, dict) and v is not None]
        for name, sub in nested.items():
            lines.append(f"[{table}.{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in sub.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_pairs(folder: Path, pairs: list[tuple[str, str]], name: str = "data.jsonl") -> Path:
    """Copy the parity pictures into ``folder/images`` and write a JSONL of relative paths."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for picture, _ in pairs:
        if not (images / picture).exists() and (PARITY / "images" / picture).exists():
            shutil.copy(PARITY / "images" / picture, images / picture)
    path = folder / name
    path.write_text("".join(json.dumps({"image": f"images/{p}", "text": t}) + "\n" for p, t in pairs))
    return path


def read_log(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def step_losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(output_dir) if "loss" in r]
