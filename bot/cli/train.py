"""``minigpt4-bot train``: MiniGPT-4's stage 1 / stage 2 training (``model.training``) from ``train.toml``.

One process: ``minigpt4-bot train --config train.toml``.  Many GPUs / nodes: start the same command
under ``torchrun`` (``torchrun --nproc_per_node 4 -m bot.cli train --config train.toml``); only rank 0
logs and saves.  The model is imported lazily, so ``minigpt4-bot --help`` stays instant.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from bot.cli.common import err, log_handler, out

__all__ = ["train_command"]


def _configure_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(message)s",
        handlers=[log_handler()],  # rich on a terminal, one line per record in a file or pipe
        force=True,
    )


def train_command(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="train.toml (default: ./train.toml, or the resumed run's)")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="output_dir of an earlier run: continue it exactly from checkpoint_last.pth"),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="stop at the first bad record (missing picture, empty text …) instead of skipping it"
        ),
    ] = False,
) -> None:
    """Train the projection (stage 1 alignment or stage 2 fine-tuning) and write checkpoints the bot loads."""
    from model.checkpoints import CheckpointError
    from model.loader import PrecisionError
    from model.training.data import DataError
    from model.training.loop import CONFIG_FILE, TrainError, run_training
    from model.training.settings import TrainConfigError, config_from_dict, load_train_config

    _configure_logging()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars: the run logs its own progress
    resume = resume.expanduser().resolve() if resume is not None else None  # the printed paths work from anywhere
    try:
        if config is None and resume is not None and (resume / CONFIG_FILE).is_file():
            saved = resume / CONFIG_FILE
            settings = config_from_dict(json.loads(saved.read_text(encoding="utf-8")), resume, str(saved))
        else:
            settings = load_train_config(config or Path("train.toml"))
    except (TrainConfigError, ValueError) as exc:
        err.print(Text(str(exc), style="red"))
        raise typer.Exit(2) from None
    try:
        result = run_training(settings, resume=resume, strict=strict, progress=True)
    except (TrainError, DataError, CheckpointError, PrecisionError) as exc:
        err.print(Text(f"Training stopped: {exc}", style="red"), soft_wrap=True)
        raise typer.Exit(1) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return
    last = result.output_dir / "checkpoint_last.pth"
    if result.interrupted:
        err.print(
            Text(f"Interrupted at step {result.step}: saved {last}. Continue with --resume {result.output_dir}"),
            soft_wrap=True,
        )
        raise typer.Exit(130)
    loss = f", last loss {result.last_loss:.4f}" if result.last_loss is not None else ""
    out.print(Text(f"Trained {result.step} steps{loss}. Checkpoint: {last}"), soft_wrap=True)
    out.print(Text(f'Serve it: set projection = "{last}" in the [model] table of bot.toml.'), soft_wrap=True)
    if result.drawn:
        drawn = ", ".join(f"{name} {count}" for name, count in result.drawn.items())
        out.print(Text(f"Batches drawn per dataset (all processes): {drawn}"), soft_wrap=True)
    if result.skipped:
        out.print(Text(f"Skipped bad records: {result.skipped}", style="yellow"), soft_wrap=True)
    if result.skipped_by_dataset:
        by_dataset = ", ".join(f"{name} {count}" for name, count in result.skipped_by_dataset.items())
        out.print(Text(f"Skipped per dataset: {by_dataset}", style="yellow"), soft_wrap=True)
