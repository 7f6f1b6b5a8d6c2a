"""The training loop: the reference's ``RunnerBase`` + ``BaseTask._train_inner_loop``, one rank of many.

Order of work (everything that can fail on configuration fails before any data is read):
``output_dir`` writable → (resume) read ``checkpoint_last.pth`` → load the model (the starting checkpoint, or
the one being resumed, through :func:`model.loader.load_minigpt4`) → freeze all but ``llama_proj`` (+ LoRA),
assert it → optimizer, scheduler, scaler → open the data → loop.

Each iteration, as the reference: set the learning rate for ``(epoch, step in epoch)``; pick the prompt
(``random.choice`` of the prompt list, one per batch, from a generator seeded ``seed + rank`` that has
already drawn the reference's "Prompt Example"); forward under fp16 autocast when ``amp`` is on and the
device is CUDA; ``loss.backward()`` (not divided by ``accum_grad_iters``, as the reference); every
``accum_grad_iters`` iterations of the epoch ``optimizer.step()`` (through the ``GradScaler`` under AMP)
and ``zero_grad``.  Under ``torchrun`` the frozen modules sit outside DDP's bookkeeping (ignored
parameters and buffers): only the trained tensors are broadcast at start and all-reduced (averaged) after
each backward, so the update is that of the mean of the ranks' per-rank mean losses — what the reference's
DDP computes.

Each iteration first draws the data source, then the prompt, both from the one generator seeded
``seed + rank`` — the reference's ``MultiIterLoader`` and ``preparing_embedding`` both draw from the global
``random`` that ``setup_seeds`` seeded, in that order.  The reference wraps a single dataset in a
``MultiIterLoader`` too, so one ``data`` source is read as a mix of one (:mod:`model.training.mix`) and its
draw (one ``random()``) is made all the same: the prompts of a run are the reference's for the same seed.

The trainer only steps; logging, the progress bar, periodic checkpoints and evaluation, the stop on Ctrl-C and
the closing summary are callbacks (:mod:`model.training.callbacks`), called in order after each optimizer step.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.training import dist as dist_utils
from model.training.batch import BatchBuilder
from model.training.callbacks import StepEnd, StepHook, StopFlag, TrainerCallback, default_callbacks
from model.training.checkpoint import LAST, save_checkpoint
from model.training.data import BadRecords, Batch, BatchStream, ListSource, blip_caption, open_source
from model.training.loss import LossModule, text_tensors
from model.training.mix import MixedBadRecords, MixedPosition, MixedStream
from model.training.optim import LinearWarmupCosineLR, build_optimizer
from model.training.prepare import freeze_all_but_trained, training_device, write_initial_projection
from model.training.resume import checkpoint_payload, rank_state, read_resume_checkpoint, restore_rank, saved_position
from model.training.settings import ALIGNMENT_PROMPTS, TrainConfig

__all__ = ["TrainError", "TrainResult", "Trainer", "load_prompts", "run_training"]

log = logging.getLogger("minigpt4_bot.train")

CONFIG_FILE = "train_config.json"


class TrainError(RuntimeError):
    """Training cannot start or go on; the message names the file or setting at fault."""


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    last_loss: float | None = None
    interrupted: bool = False
    skipped: dict[str, int] = field(default_factory=dict)
    checkpoints: list[Path] = field(default_factory=list)
    drawn: dict[str, int] = field(default_factory=dict)  # several datasets: batches drawn from each (all processes)
    skipped_by_dataset: dict[str, int] = field(default_factory=dict)


def load_prompts(config: TrainConfig) -> list[str]:
    """Stage 2: the prompt file's lines with ``<ImageHere>``, each put in the template (reference ``from_config``)."""
    train = config.train
    if train.stage == 1:
        return []
    if train.prompts:
        path = Path(train.prompts)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise TrainError(f"cannot read the prompt file {path}: {exc}") from exc
        where = str(path)
    else:
        lines, where = list(ALIGNMENT_PROMPTS), "the built-in alignment prompts"
    kept = [line for line in lines if "<ImageHere>" in line]
    if not kept:
        raise TrainError(
            f"{where}: no line contains <ImageHere> (each prompt line must, e.g. '<Img><ImageHere></Img> …')"
        )
    assert train.prompt_template is not None
    return [train.prompt_template.format(line) for line in kept]


class Trainer:
    """One rank's training run; :func:`run_training` is the entry point.

    ``callbacks`` (e.g. a :class:`~model.training.callbacks.StepHook`) run after the built-in ones' step work and
    before the stop check; ``on_step(trainer, step, loss)`` is one such hook."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: Path | None = None,
        strict: bool = False,
        on_step: Callable[[Trainer, int, float], None] | None = None,
        progress: bool = True,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> None:
        self.config = config
        self.train = config.train
        self.resume_dir = resume
        self.strict = strict
        extra = [*callbacks, *([StepHook(on_step)] if on_step is not None else [])]
        self.callbacks = default_callbacks(progress=progress, extra=extra)
        if resume is not None and Path(resume).resolve() != Path(self.train.output_dir).resolve():
            log.info("resuming: writing into %s (not the configured output_dir %s)", resume, self.train.output_dir)
            self.train.output_dir = str(Path(resume).resolve())
        self.output_dir = Path(self.train.output_dir)
        self.stop = StopFlag()
        self.step = 0
        self.position = MixedPosition.start(len(self.train.sources))
        self.result = TrainResult(step=0, output_dir=self.output_dir)
        self._eval_named = False

    def info(self, message: str, *args: Any) -> None:
        if self.dist.is_main:
            log.info(message, *args)

    def _fire(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # ------------------------------------------------------------------ setup

    def _check_output_dir(self) -> None:
        probe = self.output_dir / f".write-test-{self.dist.rank}"
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise TrainError(f"output_dir {self.output_dir} is not writable ({exc}); set [train].output_dir") from exc

    def _load_model(self, projection: str) -> Any:
        from model.loader import load_minigpt4

        kwargs = self.config.model.loader_kwargs() | {"projection": projection}
        if self.dist.enabled and self.use_cuda:
            kwargs["device"] = f"cuda:{self.dist.local_rank}"
        return load_minigpt4(**kwargs)

    def _initial_projection(self) -> Path:
        """Stage 1 from scratch: the seeded random ``llama_proj``, written once (rank 0) to initial_projection.pth."""
        path = self.output_dir / "initial_projection.pth"
        if self.dist.is_main:
            try:
                features = write_initial_projection(self.config, path)
            except ValueError as exc:
                raise TrainError(str(exc)) from exc
            self.info("stage 1 from a random projection (%d → %d), written to %s", *features, path)
        dist_utils.barrier(self.dist)
        return path

    def _resume_checkpoint(self) -> dict[str, Any]:
        """``checkpoint_last.pth`` of the run being resumed, checked against this launch's process count."""
        try:
            return read_resume_checkpoint(Path(self.resume_dir or ".") / LAST, self.dist.world)
        except ValueError as exc:
            raise TrainError(str(exc)) from exc

    def _setup(self) -> None:
        """Everything that can fail on configuration, in the module docstring's order, before any data is read."""
        self.use_cuda = training_device(self.config).type == "cuda"
        self.dist = dist_utils.init_distributed(self.use_cuda)
        self._check_output_dir()
        checkpoint = self._resume_checkpoint() if self.resume_dir is not None else None
        if checkpoint is not None:
            projection = str(Path(self.resume_dir or ".") / LAST)
        else:
            projection = self.config.model.projection or str(self._initial_projection())
        self.prompts = load_prompts(self.config)
        self.model = self._load_model(projection)
        self.device = self.model.device
        self.amp = bool(self.train.amp and self.device.type == "cuda")
        if self.train.amp and not self.amp:
            self.info("amp is on but the device is %s: training in full precision (AMP is CUDA only)", self.device)
        named, trainable = freeze_all_but_trained(self.model)
        self.info(trainable)
        self._build_optimizer(named)
        self._seed()
        if checkpoint is not None:
            self._restore(checkpoint)
        self.loss_module = self._wrap_loss_module()
        self._open_data()
        if self.dist.is_main:
            settings = {"model": self.config.model.model_dump(), "train": self.train.model_dump()}
            (self.output_dir / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    def _build_optimizer(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """AdamW, the warmup-cosine schedule, the (AMP) grad scaler and the batch builder, as the reference's."""
        train = self.train
        assert train.init_lr is not None and train.max_epoch is not None and train.iters_per_epoch is not None
        self.optimizer = build_optimizer(
            named, init_lr=train.init_lr, weight_decay=train.weight_decay, beta2=train.beta2
        )
        self.scheduler = LinearWarmupCosineLR(
            max_epoch=train.max_epoch,
            iters_per_epoch=train.iters_per_epoch,
            init_lr=train.init_lr,
            min_lr=float(train.min_lr or 0.0),
            warmup_lr=float(train.warmup_lr if train.warmup_lr is not None else -1),
            warmup_steps=int(train.warmup_steps or 0),
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        assert train.end_sym is not None and train.max_txt_len is not None
        self.builder = BatchBuilder(
            self.model.tokenizer,
            num_visual_tokens=self.model.spec.num_visual_tokens,
            end_sym=train.end_sym,
            max_txt_len=train.max_txt_len,
        )

    def _seed(self) -> None:
        """train.py's ``setup_seeds`` (seed + rank) — then the model's ``from_config`` draws one "Prompt Example"."""
        torch.manual_seed(self.train.seed + self.dist.rank)
        self.prompt_rng = random.Random(self.train.seed + self.dist.rank)
        if self.prompts:
            self.info("%d training prompts; example: %s", len(self.prompts), self.prompt_rng.choice(self.prompts))

    def _wrap_loss_module(self) -> nn.Module:
        """The loss module, in DDP under ``torchrun`` with the frozen tensors outside its bookkeeping."""
        module = LossModule(self.model)
        if not self.dist.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        frozen = [f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad]
        frozen += [f"model.{n}" for n, _ in self.model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
        return DDP(module, device_ids=[self.dist.local_rank] if self.use_cuda else None)

    def _open_stream(
        self, spec: str, *, shuffle: bool, bad: BadRecords, training: bool = True, batch_size: int | None = None
    ) -> BatchStream:
        train = self.train
        batch_size = batch_size or train.batch_size
        assert batch_size is not None
        source = open_source(spec, bad)  # DataError names the file (and the line, with --strict)
        if training and isinstance(source, ListSource) and len(source) < batch_size * self.dist.world:
            raise TrainError(
                f"{spec}: {len(source)} usable record(s), fewer than batch_size × processes = "
                f"{batch_size} × {self.dist.world}"
            )
        return BatchStream(
            source,
            self.model.image_processor,
            blip_caption if train.stage == 1 else (lambda text: text),
            bad,
            batch_size=batch_size,
            rank=self.dist.rank,
            world=self.dist.world,
            shuffle=shuffle,
            seed=train.seed,
            num_workers=train.num_workers,
        )

    def _open_data(self) -> None:
        """The training sources as one mix (``data`` is a mix of one), each with its stream and bad-record counter."""
        sources = self.train.sources
        parts = {d.name: BadRecords(strict=self.strict, emit=self.dist.is_main) for d in sources}
        streams = [
            self._open_stream(d.data, shuffle=self.train.shuffle, bad=parts[d.name], batch_size=d.batch_size)
            for d in sources
        ]
        # the source draws share the prompt generator: the reference draws both from the global `random`
        self.stream = MixedStream(
            streams, [d.sample_ratio for d in sources], [d.name for d in sources], self.prompt_rng
        )
        self.bad = MixedBadRecords(parts)
        if self.train.mixed:
            self.info(
                "%d datasets, one batch per step from one of them (probability sample_ratio / %g): %s",
                len(sources), sum(d.sample_ratio for d in sources),
                "; ".join(
                    f"{d.name} (sample_ratio {d.sample_ratio:g} = {w:.1%}, batch {d.batch_size}, {d.data})"
                    for d, w in zip(sources, self.stream.weights, strict=True)
                ),
            )  # fmt: skip

    # ------------------------------------------------------------------ resume state

    def _rank_state(self) -> dict[str, Any]:
        cuda = self.device if self.use_cuda else None
        return rank_state(self.prompt_rng, self.position, mixed=self.train.mixed, cuda_device=cuda)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as exc:
            raise TrainError(f"the optimizer state in {self.resume_dir}/{LAST} does not fit this model: {exc}") from exc
        if self.amp and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = int(checkpoint.get("step", 0))
        ranks = checkpoint.get("resume", {}).get("ranks") or []
        if len(ranks) > self.dist.rank:
            state = ranks[self.dist.rank]
            self.position = self._saved_position(state["position"])
            restore_rank(state, self.prompt_rng, self.device if self.use_cuda else None)
        self.info("resuming at step %d from %s", self.step, Path(self.resume_dir or ".") / LAST)

    def _saved_position(self, saved: Any) -> MixedPosition:
        """The checkpoint's data position, checked against the configured data (one source, or N mixed)."""
        try:
            return saved_position(saved, len(self.train.datasets), Path(self.resume_dir or ".") / LAST)
        except ValueError as exc:
            raise TrainError(str(exc)) from exc

    def save(self, snapshot: dict[str, Any]) -> list[Path]:
        """Write ``checkpoint_<step>.pth`` and ``checkpoint_last.pth`` (rank 0) from the step's resume snapshot."""
        ranks = dist_utils.all_gather_objects(self.dist, snapshot)
        written: list[Path] = []
        if self.dist.is_main:
            scaler = self.scaler if self.amp else None
            payload = checkpoint_payload(
                model=self.model,
                optimizer=self.optimizer,
                scaler=scaler,
                config=self.config,
                step=self.step,
                ranks=ranks,
            )
            written.append(save_checkpoint(self.output_dir / f"checkpoint_{self.step}.pth", payload))
            written.append(save_checkpoint(self.output_dir / LAST, payload))
            log.info("saved %s", written[0])
        dist_utils.barrier(self.dist)
        return written

    # ------------------------------------------------------------------ evaluation

    def _forward(self, batch: Batch, prompt: str | None) -> torch.Tensor:
        text = self.builder.build(batch.texts, prompt)
        pixels = batch.pixels.to(self.device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            return self.loss_module(pixels, text_tensors(text, self.device))

    def evaluate(self) -> float | None:
        """Mean batch loss over one pass of ``eval_data`` (prompts from a fresh ``Random(seed)``; no gradients)."""
        if not self.train.eval_data:
            return None
        bad = BadRecords(strict=self.strict, emit=self.dist.is_main and not self._eval_named)
        self._eval_named = True  # name the eval set's bad records once, not at every evaluation
        stream = self._open_stream(self.train.eval_data, shuffle=False, bad=bad, training=False)
        module = (
            self.loss_module.module
            if isinstance(self.loss_module, nn.parallel.DistributedDataParallel)
            else self.loss_module
        )
        dropout = [m for n, m in self.model.llm.named_modules() if "lora_dropout" in n]
        for m in dropout:
            m.eval()
        total, count = self._eval_pass(module, stream)
        for m in dropout:
            m.train()
        total, count = dist_utils.all_reduce_sum(self.dist, [total, count])
        value = total / count if count else float("nan")
        self._fire("on_evaluate", value)
        self.info("step %d: eval loss %.4f", self.step, value)
        return value

    def _eval_pass(self, module: nn.Module, stream: BatchStream) -> tuple[float, float]:
        """The summed batch losses and the batch count of one pass over ``stream``."""
        rng = random.Random(self.train.seed)
        total = count = 0.0
        with torch.no_grad():
            for batch in stream.batches(once=True):
                prompt = rng.choice(self.prompts) if self.prompts else None
                text = self.builder.build(batch.texts, prompt)
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                    loss = module(batch.pixels.to(self.device), text_tensors(text, self.device))
                total += float(loss)
                count += 1
        return total, count

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        try:
            self._setup()
            with self.stop:
                return self._loop()
        finally:
            # DDP's reducer holds the process group: free it first, or tearing the group down later deadlocks
            self.loss_module = None  # type: ignore[assignment]
            gc.collect()
            dist_utils.shutdown(getattr(self, "dist", dist_utils.DistInfo()))

    def _loop(self) -> TrainResult:
        """Steps until ``total_steps`` or a callback's stop; then the last checkpoint and ``on_train_end``."""
        train = self.train
        result = self.result = TrainResult(step=self.step, output_dir=self.output_dir)
        self.info(
            "stage %d: %d steps (%d per epoch), batch %d × %d process(es), accum %d, lr %g → %g (warmup %g over %d)",
            train.stage, train.total_steps, train.iters_per_epoch, train.batch_size, self.dist.world,
            train.accum_grad_iters, train.init_lr, train.min_lr, train.warmup_lr, train.warmup_steps,
        )  # fmt: skip
        self.snapshot = self._rank_state()
        self._fire("on_train_begin")
        try:
            self._steps(result)
        finally:
            self._fire("on_loop_end")
        result.step = self.step
        result.checkpoints += self.save(self.snapshot)
        result.skipped = dict(self.bad.counts)
        self._fire("on_train_end", result)
        return result

    def _steps(self, result: TrainResult) -> None:
        batches: Iterator[Batch] = self.stream.batches(self.position)
        losses: list[torch.Tensor] = []
        try:
            while self.step < self.train.total_steps:
                batch = next(batches)  # the mix draws its source here, from prompt_rng
                loss, lr, boundary = self._backward(batch)
                losses.append(loss)
                if not boundary:
                    continue
                end = self._optimizer_step(batch, losses, lr)
                losses = []
                result.last_loss, result.drawn, result.skipped_by_dataset = end.loss, end.drawn, end.skipped_by_dataset
                self._fire("on_step_end", end)
                if end.should_stop:
                    result.interrupted = True
                    break
        finally:
            with contextlib.suppress(Exception):
                batches.close()  # type: ignore[attr-defined]

    def _backward(self, batch: Batch) -> tuple[torch.Tensor, float, bool]:
        """One iteration: the lr for ``(epoch, step in epoch)``, the prompt, forward and backward; whether the
        optimizer steps after it (every ``accum_grad_iters`` iterations of the epoch; DDP syncs only then)."""
        assert self.train.iters_per_epoch is not None
        cur_step = self.step % self.train.iters_per_epoch
        lr = self.scheduler.step(self.optimizer, self.step)
        prompt = self.prompt_rng.choice(self.prompts) if self.prompts else None
        boundary = (cur_step + 1) % self.train.accum_grad_iters == 0
        sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if not boundary and isinstance(self.loss_module, nn.parallel.DistributedDataParallel):
            sync = self.loss_module.no_sync()
        with sync:
            loss = self._forward(batch, prompt)
            self.scaler.scale(loss).backward()
        self.step += 1
        return loss.detach(), lr, boundary

    def _optimizer_step(self, batch: Batch, losses: list[torch.Tensor], lr: float) -> StepEnd:
        """``optimizer.step()`` (through the scaler), then the step's numbers summed over the ranks and the resume
        snapshot taken at this step."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        local = float(torch.stack(losses).float().mean())
        position = batch.position
        assert isinstance(position, MixedPosition)
        values = [local / self.dist.world, self.bad.total, *position.counts, *self.bad.by_source().values()]
        step_loss, skipped, *per_source = dist_utils.all_reduce_sum(self.dist, values)
        self.position = position
        self.snapshot = self._rank_state()
        end = StepEnd(step=self.step, loss=step_loss, lr=lr, skipped=int(skipped))
        if self.train.mixed:  # batches drawn from (and records skipped in) each dataset, all processes together
            names = self.stream.names
            end.drawn = {n: int(c) for n, c in zip(names, per_source[: len(names)], strict=True)}
            end.skipped_by_dataset = {n: int(c) for n, c in zip(names, per_source[len(names) :], strict=True) if c}
        return end


def run_training(
    config: TrainConfig,
    *,
    resume: str | Path | None = None,
    strict: bool = False,
    on_step: Callable[[Trainer, int, float], None] | None = None,
    progress: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train as ``config`` says (one process, or one rank under ``torchrun``); see the module docstring."""
    path = Path(resume) if resume else None
    trainer = Trainer(config, resume=path, strict=strict, on_step=on_step, progress=progress, callbacks=callbacks)
    return trainer.run()
