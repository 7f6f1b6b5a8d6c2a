"""Training runs on the tiny checkpoints: what changes, the first AdamW step, checkpoints, resume, Ctrl-C, bad data."""

from __future__ import annotations

import json
import logging
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoints import CheckpointError
from model.loader import load_minigpt4
from model.training.data import DataError
from model.training.loop import TrainError
from model.training.settings import TrainConfigError, load_train_config
from tests.training.helpers import (
    ANSWERS,
    EXTRA,
    PARITY,
    TRAIN_FIXTURES,
    read_log,
    step_losses,
    write_pairs,
    write_toml,
)


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_train_first_step_is_the_reference_adamw_update_and_only_the_projection_changes(
    make_config, train_run, parity_model, tmp_path
):
    """Step 1 on the reference batch at lr = warmup_lr: p ← p(1 − lr·wd) − lr·g/(|g| + eps), g = reference gradient."""
    result = train_run(make_config(max_steps=1))
    assert result.step == 1 and not result.interrupted
    (record,) = read_log(result.output_dir)
    assert record["step"] == 1 and record["lr"] == pytest.approx(1e-6)
    assert record["loss"] == pytest.approx(12.716302871704102, abs=1e-5)  # the loss *before* the update

    saved = _load(result.output_dir / "checkpoint_1.pth")
    assert set(saved["model"]) == {"llama_proj.weight", "llama_proj.bias"}
    assert {"optimizer", "config", "scaler", "epoch", "step"} <= set(saved)
    assert [g["weight_decay"] for g in saved["optimizer"]["param_groups"]] == [0.05, 0.0]
    lr, wd, eps = 1e-6, 0.05, 1e-8
    grad_w = torch.from_numpy(np.load(TRAIN_FIXTURES / "stage2__grad_llama_proj_weight.npy"))
    grad_b = torch.from_numpy(np.load(TRAIN_FIXTURES / "stage2__grad_llama_proj_bias.npy"))
    w0, b0 = parity_model.llama_proj.weight.detach(), parity_model.llama_proj.bias.detach()
    torch.testing.assert_close(
        saved["model"]["llama_proj.weight"], w0 * (1 - lr * wd) - lr * grad_w / (grad_w.abs() + eps), rtol=0, atol=1e-7
    )
    torch.testing.assert_close(
        saved["model"]["llama_proj.bias"], b0 - lr * grad_b / (grad_b.abs() + eps), rtol=0, atol=1e-7
    )

    # round trip: load_minigpt4 reads the checkpoint as a starting projection; everything else is untouched
    reloaded = load_minigpt4(
        **{**parity_model_kwargs(parity_model), "projection": str(result.output_dir / "checkpoint_last.pth")}
    )
    assert torch.equal(reloaded.llama_proj.weight, saved["model"]["llama_proj.weight"])
    before, after = parity_model.state_dict(), reloaded.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["llama_proj.bias", "llama_proj.weight"]


def parity_model_kwargs(model) -> dict:
    report = model.load_report
    files = {f.role: f.file for f in report.files}
    return dict(
        variant="vicuna0",
        llm=str(PARITY / "llama"),
        vit=files["vision encoder"],
        qformer=files["Q-Former"],
        projection=files["projection"],
        vision={k: v for k, v in vars(model.spec.vision).items()},
        qformer_dims={k: v for k, v in vars(model.spec.qformer).items()},
    )


def test_train_prompts_are_drawn_as_the_reference_draws_them(make_config, train_run, tmp_path, monkeypatch):
    """Seeded ``seed + rank``: the "Prompt Example" at start, then per step ``MultiIterLoader``'s draw (one loader:
    still one ``random()``) and ``random.choice(prompt_list)`` — the reference's global ``random``, in that order."""
    from model.training import loop
    from model.training.settings import load_train_config

    lines = [f"<Img><ImageHere></Img> {q}" for q in ("Describe this image.", "What is here?", "Tell me more.")]
    (tmp_path / "three.txt").write_text("\n".join(lines) + "\n")
    config_path = make_config(prompts="three.txt", max_steps=12, seed=7)
    used: list[str | None] = []
    forward = loop.Trainer._forward

    def spy(self, batch, prompt):
        used.append(prompt)
        return forward(self, batch, prompt)

    monkeypatch.setattr(loop.Trainer, "_forward", spy)
    train_run(config_path)
    prompts = loop.load_prompts(load_train_config(config_path))
    reference = random.Random(7 + 0)
    reference.choice(prompts)  # from_config's "Prompt Example"
    expected = []
    for _ in range(12):
        reference.choices(range(1), [1.0], k=1)  # MultiIterLoader.__next__
        expected.append(reference.choice(prompts))  # preparing_embedding
    assert used == expected and len(set(used)) > 1


def test_train_loss_decreases_and_eval_lines(make_config, train_run, tmp_path):
    data = write_pairs(tmp_path, [("shapes_64x64.png", ANSWERS[0]), ("stripes_80x48.png", ANSWERS[1])])
    result = train_run(
        make_config(max_steps=6, init_lr=2e-2, warmup_steps=0, eval_data=str(data), eval_every=3, save_every=3)
    )
    losses = step_losses(result.output_dir)
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.5, losses
    evals = [r for r in read_log(result.output_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert sorted(p.name for p in result.output_dir.glob("checkpoint_*.pth")) == [
        "checkpoint_3.pth", "checkpoint_6.pth", "checkpoint_last.pth",
    ]  # fmt: skip


def test_train_stage1_runs_on_captions_and_the_bot_loads_the_result(
    make_config, train_run, parity_model_table, tmp_path
):
    """Stage 1 from scratch (no projection: a seeded random llama_proj), BLIP-processed captions, no prompt;
    the checkpoint is a drop-in [model].projection."""
    scratch = parity_model_table | {"projection": ""}
    result = train_run(make_config(model=scratch, stage=1, max_steps=2, init_lr=1e-3, warmup_steps=0))
    initial = _load(result.output_dir / "initial_projection.pth")["model"]
    assert initial["llama_proj.weight"].shape == (64, 32)
    saved = _load(result.output_dir / "checkpoint_last.pth")
    assert saved["step"] == 2 and saved["config"]["run"]["stage"] == 1
    assert saved["config"]["run"]["end_sym"] == "\n" and saved["config"]["run"]["max_txt_len"] == 32
    table = parity_model_table | {"projection": str(result.output_dir / "checkpoint_last.pth")}
    model = load_minigpt4(
        **{k: table[k] for k in ("variant", "llm", "vit", "qformer", "projection", "vision", "qformer_dims")}
    )
    assert torch.equal(model.llama_proj.bias, saved["model"]["llama_proj.bias"])


def test_train_minigptv2_trains_projection_and_lora_only(demo_dir, train_run, tmp_path):
    demo = demo_dir["minigptv2"]
    table = {"variant": "minigptv2", "llm": str(demo.llm), "vit": str(demo.vit), "projection": str(demo.projection),
             "device": "cpu", "dtype": "float32", "vision": demo.vision}  # fmt: skip
    data = write_pairs(tmp_path, [("shapes_64x64.png", "a circle"), ("stripes_80x48.png", "stripes")])
    (tmp_path / "prompts.txt").write_text("<Img><ImageHere></Img> [caption] Describe it.\n")
    config = write_toml(
        tmp_path / "train.toml",
        {"model": table, "train": {"data": str(data), "prompts": "prompts.txt", "batch_size": 2, "shuffle": False,
                                   "num_workers": 0, "max_steps": 2, "init_lr": 1e-2, "warmup_steps": 0,
                                   "output_dir": "out"}},
    )  # fmt: skip
    result = train_run(config)
    start = _load(demo.projection)["model"]
    saved = _load(result.output_dir / "checkpoint_last.pth")["model"]
    assert set(saved) == set(start)  # llama_proj + LoRA, in the published (peft 0.2.0) naming
    lora = [k for k in saved if ".lora_" in k]
    assert lora and all(
        k.startswith("llama_model.base_model.model.model.layers.") and k.endswith(("lora_A.weight", "lora_B.weight"))
        for k in lora
    )
    assert not torch.equal(saved["llama_proj.weight"], start["llama_proj.weight"])
    assert any(not torch.equal(saved[k], start[k]) for k in lora)
    reloaded = load_minigpt4(**{**demo.loader_kwargs(), "projection": str(result.output_dir / "checkpoint_last.pth")})
    original = load_minigpt4(**demo.loader_kwargs())
    before, after = original.state_dict(), reloaded.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("llama_proj.") or ".lora_" in k for k in changed)


def test_train_ctrl_c_saves_and_resume_is_bit_identical(make_config, train_run, tmp_path):
    pairs = [("shapes_64x64.png", ANSWERS[0]), ("stripes_80x48.png", ANSWERS[1]), *EXTRA]
    prompts = "<Img><ImageHere></Img> Describe this image in detail.\n<Img><ImageHere></Img> What is shown?\n"
    settings = dict(
        max_steps=5,
        shuffle=True,
        num_workers=2,
        init_lr=1e-2,
        warmup_steps=2,
        warmup_lr=1e-3,
        iters_per_epoch=3,
        max_epoch=2,
    )

    def config(folder: Path) -> Path:
        folder.mkdir()
        (folder / "prompts.txt").write_text(prompts)
        return make_config(folder, data=str(write_pairs(folder, pairs)), **settings)

    whole = train_run(config(tmp_path / "whole"))

    def interrupt(_trainer, step: int, _loss: float) -> None:
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: finish the step, save, stop

    cut = config(tmp_path / "cut")
    first = train_run(cut, on_step=interrupt)
    assert first.interrupted and first.step == 2
    out = first.output_dir
    assert (out / "checkpoint_2.pth").is_file() and (out / "checkpoint_last.pth").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are put back
    second = train_run(cut, resume=out)
    assert second.step == 5 and not second.interrupted

    assert read_log(out) == read_log(whole.output_dir)  # every step's loss and lr, bit for bit
    a, b = _load(out / "checkpoint_last.pth"), _load(whole.output_dir / "checkpoint_last.pth")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), name


def test_train_bad_records_are_skipped_counted_and_named(make_config, train_run, tmp_path, caplog):
    good = write_pairs(tmp_path, [("shapes_64x64.png", ANSWERS[0]), ("stripes_80x48.png", ANSWERS[1])])
    (tmp_path / "images" / "broken.png").write_bytes(b"not a picture")
    lines = good.read_text().splitlines()
    lines[1:1] = [
        json.dumps({"image": "images/missing.png", "text": "gone"}),
        json.dumps({"image": "images/broken.png", "text": "broken"}),
        json.dumps({"image": "images/shapes_64x64.png", "text": "   "}),
        '{"image": "images/shapes_64x64.png", "text": ',
        json.dumps({"picture": "images/shapes_64x64.png"}),
    ]
    data = tmp_path / "messy.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="minigpt4_bot.train"):
        result = train_run(make_config(data=str(data), max_steps=2))
    assert result.step == 2
    # lines are checked once when the file is read; pictures each time the stream reaches them (2 epochs here)
    assert result.skipped == {"missing picture": 2, "unreadable picture": 2, "empty text": 1, "malformed line": 2}
    for where in ("messy.jsonl:2: missing picture", "messy.jsonl:3: unreadable picture", "messy.jsonl:4: empty text",
                  "messy.jsonl:5: malformed line", "messy.jsonl:6: malformed line"):  # fmt: skip
        assert where in caplog.text
    assert all(r.get("skipped") for r in read_log(result.output_dir))

    with pytest.raises(DataError, match=r"messy\.jsonl:4: empty text \(strict mode"):
        train_run(make_config(data=str(data), output_dir="strict"), strict=True)


def test_train_setup_errors_name_the_file_before_any_data_is_read(make_config, train_run, parity_model_table, tmp_path):
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")  # reading the data with --strict would fail with a DataError

    bad_key = make_config(data=str(garbage), bogus=1)
    with pytest.raises(TrainConfigError, match=r"train\.toml.*\n.*train\.bogus: unknown setting"):
        load_train_config(bad_key)

    wrong_variant = make_config(model={**parity_model_table, "variant": "llama2"}, data=str(garbage))
    with pytest.raises(CheckpointError, match=r"pretrained_minigpt4\.pth"):
        train_run(wrong_variant, strict=True)

    unwritable = make_config(data=str(garbage), output_dir=str(garbage / "out"))
    with pytest.raises(TrainError, match=r"output_dir .*garbage\.jsonl/out is not writable"):
        train_run(unwritable, strict=True)

    missing = make_config(data=str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(TrainConfigError, match=r"train\.data: .*nowhere\.jsonl does not exist"):
        load_train_config(missing)
