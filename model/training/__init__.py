"""MiniGPT-4's two training stages, as the reference (Vision-CAIR/MiniGPT-4 ``train.py``) runs them.

``config`` (``train.toml``: the ``[model]`` table + ``[train]`` named after the reference yaml) ·
``data`` (JSONL / cc_sbu_align / WebDataset shards, BLIP caption processor, per-rank resumable streams) ·
``batch`` (``MiniGPTBase.forward``'s batch: ids, labels, loss) · ``optim`` (AdamW groups + the reference's
warmup-cosine schedule) · ``checkpoint`` (original layout) · ``dist`` (``torchrun``) · ``loop`` (the runner).
Entry point: :func:`run_training`; the command is ``minigpt4-bot train`` (``docs/training.md``).
"""

from model._lazy import lazy_exports

_EXPORTS = {
    "BatchBuilder": "model.training.batch",
    "TextBatch": "model.training.batch",
    "TrainConfig": "model.training.settings",
    "TrainConfigError": "model.training.settings",
    "TrainModelSettings": "model.training.settings",
    "TrainSettings": "model.training.settings",
    "load_train_config": "model.training.settings",
    "DataError": "model.training.data",
    "blip_caption": "model.training.data",
    "TrainError": "model.training.loop",
    "TrainResult": "model.training.loop",
    "run_training": "model.training.loop",
    "LinearWarmupCosineLR": "model.training.optim",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
