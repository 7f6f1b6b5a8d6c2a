"""The training loop's side work as callbacks, each one concern (HF transformers' ``Trainer`` callback list).

:class:`~model.training.loop.Trainer` only steps: forward, backward, the optimizer step, the step's numbers
summed over the ranks (:class:`StepEnd`).  What a run does around that is a list of callbacks, called in
list order at the same points of every run (:func:`default_callbacks`):

``JsonlLog``            ``log.jsonl``: a line per optimizer step and per evaluation; trimmed on resume
``ProgressBar``         the ``tqdm`` bar (rank 0): loss, lr, samples/s
``PeriodicCheckpoint``  ``checkpoint_<step>.pth`` every ``checkpoint_every`` steps (the trainer writes the last)
``PeriodicEvaluation``  ``eval_data`` every ``eval_every`` steps, and once at the end unless stopped
*extra callbacks*       e.g. ``run_training(on_step=…)`` as :class:`StepHook`
``StopOnSignal``        Ctrl-C / SIGTERM on any rank (:class:`StopFlag`) stops after this step, which is saved
``RunSummary``          the skipped records and the batches drawn by dataset, in the log at the end

Hooks (:class:`TrainerCallback`): ``on_train_begin`` before the first step, ``on_step_end`` after each optimizer
step (a callback sets ``StepEnd.should_stop`` to end the run there), ``on_evaluate`` after each evaluation,
``on_loop_end`` when the steps are over (always, even on an error: close what was opened) and ``on_train_end``
after the last checkpoint is written (a run that ended normally or was stopped).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from model.training import dist as dist_utils

if TYPE_CHECKING:
    from model.training.loop import Trainer, TrainResult

__all__ = [
    "LOG_FILE",
    "Callback",
    "JsonlLog",
    "PeriodicCheckpoint",
    "PeriodicEvaluation",
    "ProgressBar",
    "RunSummary",
    "StepEnd",
    "StepHook",
    "StopFlag",
    "StopOnSignal",
    "TrainerCallback",
    "default_callbacks",
]

log = logging.getLogger("minigpt4_bot.train")

LOG_FILE = "log.jsonl"


@dataclass
class StepEnd:
    """One optimizer step's numbers, all processes together; ``should_stop`` is the callbacks' answer."""

    step: int
    loss: float
    lr: float
    skipped: int = 0  # bad records so far
    drawn: dict[str, int] = field(default_factory=dict)  # several datasets: batches drawn from each so far
    skipped_by_dataset: dict[str, int] = field(default_factory=dict)
    should_stop: bool = False


class TrainerCallback(Protocol):
    """What the trainer calls; subclass :class:`Callback` to implement only the hooks a concern needs."""

    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, step: StepEnd) -> None: ...
    def on_evaluate(self, trainer: Trainer, loss: float) -> None: ...
    def on_loop_end(self, trainer: Trainer) -> None: ...
    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None: ...


class Callback:
    """Every hook of :class:`TrainerCallback`, doing nothing."""

    def on_train_begin(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, step: StepEnd) -> None:
        pass

    def on_evaluate(self, trainer: Trainer, loss: float) -> None:
        pass

    def on_loop_end(self, trainer: Trainer) -> None:
        pass

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        pass


class JsonlLog(Callback):
    """``log.jsonl`` in the output folder (rank 0): ``{"step", "loss", "lr"[, "skipped", "drawn", …]}`` a step."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """On resume, drop log lines past the resumed step (written after the checkpoint by a run that died)."""
        path = trainer.output_dir / LOG_FILE
        if trainer.resume_dir is None or not trainer.dist.is_main or not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if json.loads(line).get("step", 0) <= trainer.step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def on_step_end(self, trainer: Trainer, step: StepEnd) -> None:
        record: dict[str, Any] = {"step": step.step, "loss": step.loss, "lr": step.lr}
        if step.skipped:
            record["skipped"] = step.skipped  # all processes together
        if step.drawn:  # batches drawn from each dataset so far, all processes together
            record["drawn"] = step.drawn
            if step.skipped_by_dataset:
                record["skipped_by_dataset"] = step.skipped_by_dataset
        self._write(trainer, record)

    def on_evaluate(self, trainer: Trainer, loss: float) -> None:
        self._write(trainer, {"step": trainer.step, "eval_loss": loss})

    @staticmethod
    def _write(trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.dist.is_main:
            with (trainer.output_dir / LOG_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class ProgressBar(Callback):
    """A ``tqdm`` bar on rank 0: steps done, the step's loss and lr, samples a second since the last step."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_begin(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        from tqdm import tqdm

        train = trainer.train
        self.bar = tqdm(total=train.total_steps, initial=trainer.step, desc=f"stage {train.stage}", unit="step",
                        dynamic_ncols=True)  # fmt: skip
        # the expected batch size of the mix (one source: its batch size)
        sizes = [d.batch_size or train.batch_size or 0 for d in train.sources]
        weights = trainer.stream.weights
        self.samples_per_step = sum(w * b for w, b in zip(weights, sizes, strict=True)) * trainer.dist.world
        self.last_step, self.started = trainer.step, time.perf_counter()

    def on_step_end(self, trainer: Trainer, step: StepEnd) -> None:
        if self.bar is None:
            return
        done = step.step - self.last_step
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(done)
        self.bar.set_postfix(
            loss=f"{step.loss:.4f}", lr=f"{step.lr:.2e}", samples_s=f"{self.samples_per_step * done / elapsed:.1f}"
        )
        self.last_step, self.started = step.step, time.perf_counter()

    def on_loop_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class PeriodicCheckpoint(Callback):
    """``checkpoint_<step>.pth`` + ``checkpoint_last.pth`` each time a multiple of ``checkpoint_every`` is passed
    (not at the last step: the trainer always writes that one)."""

    def on_train_begin(self, trainer: Trainer) -> None:
        self.last_saved = trainer.step

    def on_step_end(self, trainer: Trainer, step: StepEnd) -> None:
        every = trainer.train.checkpoint_every
        if step.step // every > self.last_saved // every and step.step < trainer.train.total_steps:
            trainer.result.checkpoints += trainer.save(trainer.snapshot)
            self.last_saved = step.step


class PeriodicEvaluation(Callback):
    """The eval loss every ``eval_every`` steps (before the last), and after the last step unless stopped."""

    def on_step_end(self, trainer: Trainer, step: StepEnd) -> None:
        every = trainer.train.eval_every
        if every and step.step % every == 0 and step.step < trainer.train.total_steps:
            trainer.evaluate()

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if not result.interrupted and trainer.train.eval_data:
            trainer.evaluate()


class StepHook(Callback):
    """``fn(trainer, step, loss)`` after each optimizer step (``run_training(on_step=…)``)."""

    def __init__(self, fn: Callable[[Trainer, int, float], None]) -> None:
        self.fn = fn

    def on_step_end(self, trainer: Trainer, step: StepEnd) -> None:
        self.fn(trainer, step.step, step.loss)


class StopFlag:
    """SIGINT / SIGTERM ask for a clean stop at the next optimizer step; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning(
            "stop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort without saving)"
        )

    def __enter__(self) -> StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopOnSignal(Callback):
    """Ends the run after this step when any rank was asked to stop (its :class:`StopFlag`); says how to resume."""

    def on_step_end(self, trainer: Trainer, step: StepEnd) -> None:
        # a collective: every rank asks at every step, so that all of them stop at the same one
        if dist_utils.any_rank(trainer.dist, trainer.stop.requested) and step.step < trainer.train.total_steps:
            step.should_stop = True

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if result.interrupted:
            trainer.info("interrupted at step %d; continue with --resume %s", result.step, trainer.output_dir)


class RunSummary(Callback):
    """The skipped records (by reason; by dataset when several) and the batches drawn from each dataset."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        bad = trainer.bad
        if bad.total:
            trainer.info("skipped %d bad record(s): %s", bad.total, result.skipped)
            if trainer.train.mixed:
                trainer.info("bad records by dataset (this process): %s", bad.by_source())
        if result.drawn:
            trainer.info("batches drawn by dataset (all processes): %s", result.drawn)


def default_callbacks(*, progress: bool, extra: Sequence[TrainerCallback] = ()) -> list[TrainerCallback]:
    """The run's side work in order (see the module docstring); ``extra`` run after evaluation, before the stop."""
    side: list[TrainerCallback] = [JsonlLog()]
    if progress:
        side.append(ProgressBar())
    side += [PeriodicCheckpoint(), PeriodicEvaluation(), *extra]
    return [*side, StopOnSignal(), RunSummary()]
