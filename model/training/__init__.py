"""MiniGPT-4's two training stages, as the reference (Vision-CAIR/MiniGPT-4 ``train.py``) runs them.

``config`` (``train.toml``: the ``[model]`` table + ``[train]`` named after the reference yaml) ·
``data`` (JSONL / cc_sbu_align / WebDataset shards, BLIP caption processor, per-rank resumable streams) ·
``batch`` (``MiniGPTBase.forward``'s batch: ids, labels, loss) · ``optim`` (AdamW groups + the reference's
warmup-cosine schedule) · ``checkpoint`` (original layout) · ``dist`` (``torchrun``) · ``loop`` (the runner).
Entry point: :func:`run_training`; the command is ``minigpt4-bot train`` (``docs/training.md``).
"""

from model._lazy import by_module, lazy_exports

_EXPORTS = by_module(
    {
        "model.training.batch": ("BatchBuilder", "TextBatch"),
        "model.training.settings": (
            "TrainConfig",
            "TrainConfigError",
            "TrainModelSettings",
            "TrainSettings",
            "load_train_config",
        ),
        "model.training.data": ("DataError", "blip_caption"),
        "model.training.loop": ("TrainError", "TrainResult", "run_training"),
        "model.training.optim": ("LinearWarmupCosineLR",),
    }
)
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
