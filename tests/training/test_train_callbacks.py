"""The training loop's side work as callbacks (HF ``Trainer``'s list): hooks in order, a callback stopping a run,
one data source read as a mix of one, and the loop's modules kept small."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from model.training.callbacks import Callback, StepEnd
from model.training.loop import Trainer, TrainResult
from model.training.settings import TrainSettings
from tests.training.helpers import ANSWERS, read_log, write_pairs

TRAINING = Path(__file__).resolve().parents[2] / "model" / "training"


class Recorder(Callback):
    """Every hook, as ``(hook, step)``; stops the run after ``stop_at`` when set."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.events: list[tuple[str, Any]] = []
        self.stop_at = stop_at

    def on_train_begin(self, trainer: Trainer) -> None:
        self.events.append(("begin", trainer.step))

    def on_step_end(self, trainer: Trainer, step: StepEnd) -> None:
        self.events.append(("step", step.step))
        if step.step == self.stop_at:
            step.should_stop = True

    def on_evaluate(self, trainer: Trainer, loss: float) -> None:
        self.events.append(("evaluate", trainer.step))

    def on_loop_end(self, trainer: Trainer) -> None:
        self.events.append(("loop_end", trainer.step))

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.events.append(("end", result.step))


def test_train_callbacks_see_each_step_each_evaluation_and_the_end(make_config, train_run, tmp_path):
    data = write_pairs(tmp_path, [("shapes_64x64.png", ANSWERS[0]), ("stripes_80x48.png", ANSWERS[1])])
    recorder = Recorder()
    result = train_run(make_config(max_steps=4, eval_data=str(data), eval_every=2), callbacks=[recorder])
    # the evaluation of step 2 runs in the built-in evaluation callback, before this one's on_step_end
    assert recorder.events == [
        ("begin", 0), ("step", 1), ("evaluate", 2), ("step", 2), ("step", 3), ("step", 4), ("loop_end", 4),
        ("evaluate", 4), ("end", 4),
    ]  # fmt: skip
    assert [r["step"] for r in read_log(result.output_dir) if "eval_loss" in r] == [2, 4]


def test_train_a_callback_stops_the_run_which_is_saved_and_resumes(make_config, train_run):
    config = make_config(max_steps=4)
    recorder = Recorder(stop_at=2)
    first = train_run(config, callbacks=[recorder])
    assert first.interrupted and first.step == 2
    assert recorder.events[-3:] == [("step", 2), ("loop_end", 2), ("end", 2)]
    assert (first.output_dir / "checkpoint_2.pth").is_file()
    second = train_run(config, resume=first.output_dir)
    assert second.step == 4 and not second.interrupted
    assert [r["step"] for r in read_log(second.output_dir)] == [1, 2, 3, 4]


def test_train_one_data_source_is_a_mix_of_one():
    (source,) = TrainSettings(data="runs/pairs.jsonl", batch_size=3).sources
    assert (source.name, source.data, source.sample_ratio, source.batch_size) == ("pairs", "runs/pairs.jsonl", 1.0, 3)
    mixed = TrainSettings(datasets=[{"data": "laion/{0..9}.tar", "sample_ratio": 115}, {"data": "cc_sbu"}])
    assert [(d.name, d.sample_ratio) for d in mixed.sources] == [("laion", 115.0), ("cc_sbu", 1.0)]


def test_train_modules_stay_small():
    """No module over 500 lines and no function over 40 in model/training (the loop was one 114-line function)."""
    too_long = []
    for path in sorted(TRAINING.glob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 500:
            too_long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 40:
                too_long.append(f"{path.name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
