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
``MultiIterLoader`` too, so with one ``data`` source the draw (one ``random()``) is made all the same: the
prompts of a run are the reference's for the same seed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.training import dist as dist_utils
from model.training.batch import BatchBuilder, TextBatch, assemble_embeddings
from model.training.checkpoint import (
    LAST,
    read_checkpoint,
    save_checkpoint,
    trainable_named_parameters,
    trainable_state,
)
from model.training.config import ALIGNMENT_PROMPTS, TrainConfig
from model.training.data import (
    BadRecords,
    Batch,
    BatchStream,
    ListSource,
    MixedBadRecords,
    MixedPosition,
    MixedStream,
    blip_caption,
    open_source,
)
from model.training.optim import LinearWarmupCosineLR, build_optimizer

__all__ = ["TrainError", "TrainResult", "Trainer", "load_prompts", "run_training"]

log = logging.getLogger("minigpt4_bot.train")

CONFIG_FILE = "train_config.json"
LOG_FILE = "log.jsonl"


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


class _LossModule(nn.Module):
    """What DDP wraps: frozen encoder (no grad) → ``llama_proj`` → spliced embeddings → LLM → mean answer loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        m: Any = self.model
        out = m.encode_images_detailed(pixels)  # inference mode: ViT, ln_vision, Q-Former frozen
        frozen = out.qformer_out if out.qformer_out is not None else out.grouped
        features = frozen.clone()  # a normal tensor autograd may save
        tokens = m.llama_proj(features.to(m.llama_proj.weight.dtype))  # [B, N, H]
        batch = TextBatch(**tensors, prompt=None)
        embeds = assemble_embeddings(m.llm.get_input_embeddings(), batch, tokens)
        hidden = m.llm.model(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False)
        return _windowed_loss(m.llm.lm_head, hidden.last_hidden_state, batch.labels)


def _windowed_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over labelled positions, computing logits only where a label is predicted (same numbers, less memory)."""
    target = labels[:, 1:]
    predicting = (target != -100).any(dim=0).nonzero()
    if predicting.numel() == 0:
        return hidden.sum() * 0.0
    lo, hi = int(predicting.min()), int(predicting.max()) + 1
    logits = lm_head(hidden[:, lo:hi]).float()
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target[:, lo:hi].reshape(-1), ignore_index=-100
    )


def _to_cpu(obj: Any) -> Any:
    """Tensors anywhere in a nested dict/list moved to the CPU (checkpoints load on any machine)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _text_tensors(batch: TextBatch, device: torch.device) -> dict[str, torch.Tensor]:
    names = ("input_ids", "attention_mask", "labels", "visual_rows", "visual_cols", "visual_index")
    return {k: getattr(batch, k).to(device) for k in names}


class _StopFlag:
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

    def __enter__(self) -> _StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One rank's training run; :func:`run_training` is the entry point."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: Path | None = None,
        strict: bool = False,
        on_step: Callable[[Trainer, int, float], None] | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.train = config.train
        self.resume_dir = resume
        self.strict = strict
        self.on_step = on_step
        self.progress = progress
        if resume is not None and Path(resume).resolve() != Path(self.train.output_dir).resolve():
            log.info("resuming: writing into %s (not the configured output_dir %s)", resume, self.train.output_dir)
            self.train.output_dir = str(Path(resume).resolve())
        self.output_dir = Path(self.train.output_dir)
        self.stop = _StopFlag()
        self.step = 0
        self.position: tuple[int, int] | MixedPosition = (
            MixedPosition.start(len(self.train.datasets)) if self.train.mixed else (0, 0)
        )
        self._eval_named = False

    # ------------------------------------------------------------------ setup

    def _check_output_dir(self) -> None:
        probe = self.output_dir / f".write-test-{self.dist.rank}"
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise TrainError(f"output_dir {self.output_dir} is not writable ({exc}); set [train].output_dir") from exc

    def _device(self) -> tuple[str, bool]:
        from model.loader import resolve_precision

        kwargs = self.config.model.loader_kwargs()
        dev, _ = resolve_precision(kwargs["device"], kwargs["dtype"], kwargs["quantization"])
        return str(dev), dev.type == "cuda"

    def _load_model(self, projection: str) -> Any:
        from model.loader import load_minigpt4

        kwargs = self.config.model.loader_kwargs() | {"projection": projection}
        if self.dist.enabled and self.use_cuda:
            kwargs["device"] = f"cuda:{self.dist.local_rank}"
        return load_minigpt4(**kwargs)

    def _freeze(self) -> list[tuple[str, nn.Parameter]]:
        """Everything frozen and in eval mode but ``llama_proj`` (+ LoRA, whose dropout trains as in the reference)."""
        model = self.model
        model.eval().requires_grad_(False)
        named = trainable_named_parameters(model)
        for _, param in named:
            if param.dtype != torch.float32:  # fp32 master weights (GradScaler, AdamW); the LLM stays fp16
                param.data = param.data.float()
            param.requires_grad_(True)
        for name, module in model.llm.named_modules():
            if "lora_dropout" in name:
                module.train()
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        expected = {id(p) for _, p in named}
        assert trainable == expected, "only llama_proj (and MiniGPT-v2's LoRA) may be trained"
        lora = [n for n, _ in named if ".lora_" in n]
        if model.spec.lora is not None:
            assert lora, "MiniGPT-v2 trains LoRA on q_proj/v_proj but the model has none"
        else:
            assert not lora
        count = sum(p.numel() for _, p in named)
        parts = ", ".join(f"{n} {tuple(p.shape)}" for n, p in named if ".lora_" not in n)
        if lora:
            parts += f", {len(lora)} LoRA tensors (r={model.load_report.lora_rank}) on q_proj/v_proj"
        self.info(f"trainable: {parts} = {count:,} parameters (ViT, ln_vision, Q-Former, LLM frozen)")
        self.trainable_count = count
        return named

    def _initial_projection(self) -> Path:
        """Stage 1 from scratch (no ``projection``): a fresh ``nn.Linear`` seeded with ``seed``, as the reference
        builds ``llama_proj`` before any checkpoint; written once (rank 0) as ``initial_projection.pth``."""
        from model.variants import get_variant

        path = self.output_dir / "initial_projection.pth"
        if self.dist.is_main:
            kwargs = self.config.model.loader_kwargs()
            spec = get_variant(kwargs["variant"]).with_dims(kwargs["vision"], kwargs["qformer_dims"])
            try:
                llm_config = json.loads((Path(kwargs["llm"]) / "config.json").read_text(encoding="utf-8"))
                hidden = int(llm_config["hidden_size"])
            except (OSError, ValueError, KeyError) as exc:
                raise TrainError(f"cannot read hidden_size from {kwargs['llm']}/config.json: {exc}") from exc
            generator_state = torch.get_rng_state()
            torch.manual_seed(self.train.seed)
            layer = nn.Linear(spec.projection_in_features, hidden)
            torch.set_rng_state(generator_state)
            state = {f"llama_proj.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
            save_checkpoint(path, {"model": state})
            self.info("stage 1 from a random projection (%d → %d), written to %s", *layer.weight.shape[::-1], path)
        dist_utils.barrier(self.dist)
        return path

    def info(self, message: str, *args: Any) -> None:
        if self.dist.is_main:
            log.info(message, *args)

    def _setup(self) -> None:
        train = self.train
        _, self.use_cuda = self._device()
        self.dist = dist_utils.init_distributed(self.use_cuda)
        self._check_output_dir()
        checkpoint = None
        projection = self.config.model.projection
        if self.resume_dir is not None:
            path = Path(self.resume_dir) / LAST
            try:
                checkpoint = read_checkpoint(path)
            except (FileNotFoundError, ValueError) as exc:
                raise TrainError(str(exc)) from exc
            saved_world = checkpoint.get("resume", {}).get("world_size", 1)
            if saved_world != self.dist.world:
                raise TrainError(
                    f"{path} was written by {saved_world} process(es); resume with the same number "
                    f"(now {self.dist.world})"
                )
            projection = str(path)
        elif not projection:
            projection = str(self._initial_projection())
        self.prompts = load_prompts(self.config)
        self.model = self._load_model(projection)
        self.device = self.model.device
        self.amp = bool(train.amp and self.device.type == "cuda")
        if train.amp and not self.amp:
            self.info("amp is on but the device is %s: training in full precision (AMP is CUDA only)", self.device)
        named = self._freeze()
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
        # train.py: setup_seeds (seed + rank) — then the model's from_config draws one "Prompt Example".
        torch.manual_seed(train.seed + self.dist.rank)
        self.prompt_rng = random.Random(train.seed + self.dist.rank)
        if self.prompts:
            self.info("%d training prompts; example: %s", len(self.prompts), self.prompt_rng.choice(self.prompts))
        if checkpoint is not None:
            self._restore(checkpoint)
        module = _LossModule(self.model)
        self.loss_module: nn.Module = module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            frozen = [f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad]
            frozen += [f"model.{n}" for n, _ in self.model.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
            self.loss_module = DDP(
                module,
                device_ids=[self.dist.local_rank] if self.use_cuda else None,
            )
        self.bad: BadRecords | MixedBadRecords
        self.stream: BatchStream | MixedStream
        if train.mixed:
            self.stream, self.bad = self._open_mix()
        else:
            self.bad = BadRecords(strict=self.strict, emit=self.dist.is_main)
            self.stream = self._open_stream(train.data, shuffle=train.shuffle, bad=self.bad)
        if self.dist.is_main:
            (self.output_dir / CONFIG_FILE).write_text(
                json.dumps({"model": self.config.model.model_dump(), "train": self.config.train.model_dump()}, indent=2)
                + "\n"
            )

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

    def _open_mix(self) -> tuple[MixedStream, MixedBadRecords]:
        """``[[train.datasets]]``: one stream (and bad-record counter) per source, drawn by ``sample_ratio``."""
        datasets = self.train.datasets
        parts = {d.name: BadRecords(strict=self.strict, emit=self.dist.is_main) for d in datasets}
        streams = [
            self._open_stream(d.data, shuffle=self.train.shuffle, bad=parts[d.name], batch_size=d.batch_size)
            for d in datasets
        ]
        # the source draws share the prompt generator: the reference draws both from the global `random`
        mix = MixedStream(streams, [d.sample_ratio for d in datasets], [d.name for d in datasets], self.prompt_rng)
        self.info(
            "%d datasets, one batch per step from one of them (probability sample_ratio / %g): %s",
            len(datasets), sum(d.sample_ratio for d in datasets),
            "; ".join(
                f"{d.name} (sample_ratio {d.sample_ratio:g} = {w:.1%}, batch {d.batch_size}, {d.data})"
                for d, w in zip(datasets, mix.weights, strict=True)
            ),
        )  # fmt: skip
        return mix, MixedBadRecords(parts)

    # ------------------------------------------------------------------ resume state

    def _rank_state(self) -> dict[str, Any]:
        version, internal, gauss = self.prompt_rng.getstate()
        position = self.position
        state: dict[str, Any] = {
            "position": position.to_state() if isinstance(position, MixedPosition) else list(position),
            "torch_rng": torch.get_rng_state(),
            "prompt_rng": [version, list(internal), gauss],
        }
        if self.use_cuda:
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

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
            torch.set_rng_state(state["torch_rng"])
            if self.use_cuda and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            version, internal, gauss = state["prompt_rng"]
            self.prompt_rng.setstate((version, tuple(internal), gauss))
        self.info("resuming at step %d from %s", self.step, Path(self.resume_dir or ".") / LAST)

    def _saved_position(self, saved: Any) -> tuple[int, int] | MixedPosition:
        """The checkpoint's data position, checked against the configured data (one source, or N mixed)."""
        where = Path(self.resume_dir or ".") / LAST
        if isinstance(saved, dict):
            position = MixedPosition.from_state(saved)
            if len(position.positions) != len(self.train.datasets):
                configured = f"{len(self.train.datasets)} [[train.datasets]]" if self.train.mixed else "one data source"
                raise TrainError(
                    f"{where} was written by a run mixing {len(position.positions)} datasets but {configured} "
                    "is configured now; resume with the same data"
                )
            return position
        if self.train.mixed:
            raise TrainError(
                f"{where} was written by a run on one data source but {len(self.train.datasets)} "
                "[[train.datasets]] are configured now; resume with the same data"
            )
        return (int(saved[0]), int(saved[1]))

    def _payload(self, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        assert self.train.iters_per_epoch is not None
        return {
            "model": trainable_state(self.model),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "config": self.config.to_dict(),
            "scaler": self.scaler.state_dict() if self.amp else None,
            "epoch": max(self.step - 1, 0) // self.train.iters_per_epoch,
            "step": self.step,
            "resume": {"world_size": self.dist.world, "ranks": ranks},
        }

    def save(self, snapshot: dict[str, Any]) -> list[Path]:
        """Write ``checkpoint_<step>.pth`` and ``checkpoint_last.pth`` (rank 0) from the step's resume snapshot."""
        ranks = dist_utils.all_gather_objects(self.dist, snapshot)
        written: list[Path] = []
        if self.dist.is_main:
            payload = self._payload(ranks)
            written.append(save_checkpoint(self.output_dir / f"checkpoint_{self.step}.pth", payload))
            written.append(save_checkpoint(self.output_dir / LAST, payload))
            log.info("saved %s", written[0])
        dist_utils.barrier(self.dist)
        return written

    # ------------------------------------------------------------------ the loop

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with (self.output_dir / LOG_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _trim_log(self) -> None:
        """On resume, drop log lines past the resumed step (written after the checkpoint by a run that died)."""
        path = self.output_dir / LOG_FILE
        if not self.dist.is_main or not path.is_file():
            return
        kept = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if json.loads(line).get("step", 0) <= self.step
        ]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _forward(self, batch: Batch, prompt: str | None) -> torch.Tensor:
        text = self.builder.build(batch.texts, prompt)
        pixels = batch.pixels.to(self.device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            return self.loss_module(pixels, _text_tensors(text, self.device))

    def evaluate(self) -> float | None:
        """Mean batch loss over one pass of ``eval_data`` (prompts from a fresh ``Random(seed)``; no gradients)."""
        if not self.train.eval_data:
            return None
        bad = BadRecords(strict=self.strict, emit=self.dist.is_main and not self._eval_named)
        self._eval_named = True  # name the eval set's bad records once, not at every evaluation
        stream = self._open_stream(self.train.eval_data, shuffle=False, bad=bad, training=False)
        rng = random.Random(self.train.seed)
        total = count = 0.0
        module = (
            self.loss_module.module
            if isinstance(self.loss_module, nn.parallel.DistributedDataParallel)
            else self.loss_module
        )
        dropout = [m for n, m in self.model.llm.named_modules() if "lora_dropout" in n]
        for m in dropout:
            m.eval()
        with torch.no_grad():
            for batch in stream.batches(once=True):
                prompt = rng.choice(self.prompts) if self.prompts else None
                text = self.builder.build(batch.texts, prompt)
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                    loss = module(batch.pixels.to(self.device), _text_tensors(text, self.device))
                total += float(loss)
                count += 1
        for m in dropout:
            m.train()
        total, count = dist_utils.all_reduce_sum(self.dist, [total, count])
        value = total / count if count else float("nan")
        self._log({"step": self.step, "eval_loss": value})
        self.info("step %d: eval loss %.4f", self.step, value)
        return value

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
        train = self.train
        assert train.iters_per_epoch is not None and train.batch_size is not None
        total = train.total_steps
        accum = train.accum_grad_iters
        every = train.checkpoint_every
        result = TrainResult(step=self.step, output_dir=self.output_dir)
        if self.resume_dir is not None:
            self._trim_log()
        self.info(
            "stage %d: %d steps (%d per epoch), batch %d × %d process(es), accum %d, lr %g → %g (warmup %g over %d)",
            train.stage, total, train.iters_per_epoch, train.batch_size, self.dist.world, accum,
            train.init_lr, train.min_lr, train.warmup_lr, train.warmup_steps,
        )  # fmt: skip
        mix = self.stream if isinstance(self.stream, MixedStream) else None
        names = mix.names if mix is not None else []
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc=f"stage {train.stage}", unit="step", dynamic_ncols=True)
        batches: Iterator[Batch] = self.stream.batches(self.position)  # type: ignore[arg-type]
        group_losses: list[torch.Tensor] = []
        snapshot = self._rank_state()
        last_saved = self.step
        samples_per_step = train.batch_size * self.dist.world
        if mix is not None:  # the expected batch size of the mix
            sizes = [d.batch_size or train.batch_size for d in train.datasets]
            samples_per_step = sum(w * b for w, b in zip(mix.weights, sizes, strict=True)) * self.dist.world
        started = time.perf_counter()
        done_since = 0
        try:
            while self.step < total:
                batch = next(batches)  # a mix draws its source here, from prompt_rng
                if mix is None:  # the reference wraps even one loader in MultiIterLoader: one random() a step
                    self.prompt_rng.random()
                cur_step = self.step % train.iters_per_epoch
                lr = self.scheduler.step(self.optimizer, self.step)
                prompt = self.prompt_rng.choice(self.prompts) if self.prompts else None
                boundary = (cur_step + 1) % accum == 0
                sync = contextlib.nullcontext()
                if not boundary and isinstance(self.loss_module, nn.parallel.DistributedDataParallel):
                    sync = self.loss_module.no_sync()
                with sync:
                    loss = self._forward(batch, prompt)
                    self.scaler.scale(loss).backward()
                group_losses.append(loss.detach())
                self.step += 1
                done_since += 1
                if not boundary:
                    continue
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                local = float(torch.stack(group_losses).float().mean())
                group_losses = []
                values = [local / self.dist.world, self.bad.total]
                if mix is not None:
                    assert isinstance(batch.position, MixedPosition) and isinstance(self.bad, MixedBadRecords)
                    values += [*batch.position.counts, *self.bad.by_source().values()]
                step_loss, skipped, *per_source = dist_utils.all_reduce_sum(self.dist, values)
                result.last_loss = step_loss
                self.position = batch.position
                snapshot = self._rank_state()
                record: dict[str, Any] = {"step": self.step, "loss": step_loss, "lr": lr}
                if skipped:
                    record["skipped"] = int(skipped)  # all processes together
                if mix is not None:  # batches drawn from each dataset so far, all processes together
                    result.drawn = {n: int(c) for n, c in zip(names, per_source[: len(names)], strict=True)}
                    result.skipped_by_dataset = {
                        n: int(c) for n, c in zip(names, per_source[len(names) :], strict=True) if c
                    }
                    record["drawn"] = result.drawn
                    if result.skipped_by_dataset:
                        record["skipped_by_dataset"] = result.skipped_by_dataset
                self._log(record)
                if bar is not None:
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.update(done_since)
                    bar.set_postfix(
                        loss=f"{step_loss:.4f}",
                        lr=f"{lr:.2e}",
                        samples_s=f"{samples_per_step * done_since / elapsed:.1f}",
                    )
                    started, done_since = time.perf_counter(), 0
                if self.step // every > last_saved // every and self.step < total:
                    result.checkpoints += self.save(snapshot)
                    last_saved = self.step
                if train.eval_every and self.step % train.eval_every == 0 and self.step < total:
                    self.evaluate()
                if self.on_step is not None:
                    self.on_step(self, self.step, step_loss)
                if dist_utils.any_rank(self.dist, self.stop.requested) and self.step < total:
                    result.interrupted = True
                    break
        finally:
            if bar is not None:
                bar.close()
            with contextlib.suppress(Exception):
                batches.close()  # type: ignore[attr-defined]
        result.step = self.step
        result.checkpoints += self.save(snapshot)
        if result.interrupted:
            self.info("interrupted at step %d; continue with --resume %s", self.step, self.output_dir)
        elif self.train.eval_data:
            self.evaluate()
        result.skipped = dict(self.bad.counts)
        if self.bad.total:
            self.info("skipped %d bad record(s): %s", self.bad.total, result.skipped)
            if isinstance(self.bad, MixedBadRecords):
                self.info("bad records by dataset (this process): %s", self.bad.by_source())
        if result.drawn:
            self.info("batches drawn by dataset (all processes): %s", result.drawn)
        return result


def run_training(
    config: TrainConfig,
    *,
    resume: str | Path | None = None,
    strict: bool = False,
    on_step: Callable[[Trainer, int, float], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train as ``config`` says (one process, or one rank under ``torchrun``); see the module docstring."""
    trainer = Trainer(
        config, resume=Path(resume) if resume else None, strict=strict, on_step=on_step, progress=progress
    )
    return trainer.run()
