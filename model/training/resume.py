"""What a checkpoint holds beyond the weights, and how a run picks up from it exactly (``--resume``).

``checkpoint_last.pth`` has ``resume = {"world_size", "ranks": [per-rank state]}``; a rank's state is its data
position (one source: the ``[epoch, records read]`` pair; several: :meth:`MixedPosition.to_state`), the torch
(and CUDA) generator states and the prompt generator's state.  Every check here raises ``ValueError`` with
the file and the fix; the trainer reports it as a ``TrainError``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.training.checkpoint import read_checkpoint, trainable_state
from model.training.mix import MixedPosition
from model.training.settings import TrainConfig

__all__ = ["checkpoint_payload", "rank_state", "read_resume_checkpoint", "restore_rank", "saved_position"]


def read_resume_checkpoint(path: Path, world: int) -> dict[str, Any]:
    """The checkpoint being resumed, which must have been written by as many processes as run now."""
    try:
        checkpoint = read_checkpoint(path)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from exc
    saved_world = checkpoint.get("resume", {}).get("world_size", 1)
    if saved_world != world:
        raise ValueError(f"{path} was written by {saved_world} process(es); resume with the same number (now {world})")
    return checkpoint


def rank_state(
    prompt_rng: random.Random, position: MixedPosition, *, mixed: bool, cuda_device: torch.device | None
) -> dict[str, Any]:
    """This rank's part of a checkpoint: data position and generators."""
    version, internal, gauss = prompt_rng.getstate()
    state: dict[str, Any] = {
        "position": position.to_state() if mixed else list(position.positions[0]),
        "torch_rng": torch.get_rng_state(),
        "prompt_rng": [version, list(internal), gauss],
    }
    if cuda_device is not None:
        state["cuda_rng"] = torch.cuda.get_rng_state(cuda_device)
    return state


def restore_rank(state: dict[str, Any], prompt_rng: random.Random, cuda_device: torch.device | None) -> None:
    """Put this rank's generators back as :func:`rank_state` saved them."""
    torch.set_rng_state(state["torch_rng"])
    if cuda_device is not None and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], cuda_device)
    version, internal, gauss = state["prompt_rng"]
    prompt_rng.setstate((version, tuple(internal), gauss))


def saved_position(saved: Any, datasets: int, where: Path) -> MixedPosition:
    """The checkpoint's data position, checked against the data configured now: ``datasets`` tables, or 0 for
    one ``data`` source (read as a mix of one)."""
    if isinstance(saved, dict):
        position = MixedPosition.from_state(saved)
        if len(position.positions) != datasets:
            configured = f"{datasets} [[train.datasets]]" if datasets else "one data source"
            raise ValueError(
                f"{where} was written by a run mixing {len(position.positions)} datasets but {configured} "
                "is configured now; resume with the same data"
            )
        return position
    if datasets:
        raise ValueError(
            f"{where} was written by a run on one data source but {datasets} "
            "[[train.datasets]] are configured now; resume with the same data"
        )
    return MixedPosition(((int(saved[0]), int(saved[1])),), (0,))  # a mix of one (its draw count is not saved)


def checkpoint_payload(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    config: TrainConfig,
    step: int,
    ranks: list[dict[str, Any]],
) -> dict[str, Any]:
    """The original-layout checkpoint (``model``, ``optimizer``, ``config``, ``scaler``, ``epoch``, ``step``) plus
    ``resume``; ``scaler`` is ``None`` without AMP."""
    iters_per_epoch = config.train.iters_per_epoch
    assert iters_per_epoch is not None
    return {
        "model": trainable_state(model),
        "optimizer": _to_cpu(optimizer.state_dict()),
        "config": config.to_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": max(step - 1, 0) // iters_per_epoch,
        "step": step,
        "resume": {"world_size": len(ranks), "ranks": ranks},
    }


def _to_cpu(obj: Any) -> Any:
    """Tensors anywhere in a nested dict/list moved to the CPU (checkpoints load on any machine)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
