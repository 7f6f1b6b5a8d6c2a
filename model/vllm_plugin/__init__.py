"""MiniGPT-4 for vLLM: the model plugin, the export, and the worker the bot's ``vllm`` backend runs.

``register`` is the ``vllm.general_plugins`` entry point (``pyproject.toml``).  vLLM calls it in every
process it starts (API server, engine core, workers), possibly more than once, so it is idempotent and
cheap: it registers the config class with ``AutoConfig`` and the model class *by name* (vLLM imports
:mod:`model.vllm_plugin.modeling` only when a ``MiniGPT4ForConditionalGeneration`` folder is loaded).

Modules: :mod:`~model.vllm_plugin.configuration` (``config.json``), :mod:`~model.vllm_plugin.modeling`
(the vLLM model; vLLM environment only), :mod:`~model.vllm_plugin.export` (original files → model
folder; bot environment), :mod:`~model.vllm_plugin.worker` (the backend's server).
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Make ``model_type = "minigpt4"`` folders loadable by vLLM (safe to call repeatedly)."""
    from vllm import ModelRegistry

    from model.vllm_plugin.configuration import ARCHITECTURE, register_config

    register_config()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"model.vllm_plugin.modeling:{ARCHITECTURE}")
