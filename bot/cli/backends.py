"""The built-in generation backend: the local engine on this machine's model (entry point ``local``).

It lives in the entry layer because building it means loading weights (``model``) from the core's
settings (``bot.core``); the core only sees the :class:`~bot.core.backend_api.GenerationBackend` it returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bot.core.backend_api import BackendPlugin, GenerationBackend
from bot.core.config import EngineSettings, Settings

if TYPE_CHECKING:
    from model import MiniGPT4
    from model.engine import EngineConfig

__all__ = ["LOCAL", "demo_weights_in_use", "engine_config", "load_model", "model_summary"]

log = logging.getLogger(__name__)


def demo_weights_in_use(settings: Settings) -> bool:
    """No weights configured, or the configured ones were written by ``weights demo`` (its marker file)."""
    from model.demo_weights import is_demo_weights

    model = settings.model
    return model.uses_demo_weights or any(is_demo_weights(p) for p in (model.llm, model.vit, model.projection))


def load_model(settings: Settings, progress: Callable[[str, int], None] | None = None) -> MiniGPT4:
    """Load the configured weights, writing tiny demo weights first when none are configured.

    Logs the demo-weights warning (the one place it is logged, so once per start) and one summary line
    of what was loaded.  transformers' own progress bars are off unless ``log_level = "DEBUG"``: the
    command line shows one progress bar of its own.
    """
    from model import load_minigpt4

    if settings.log_level != "DEBUG":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = settings.model.loader_kwargs()
    if settings.model.uses_demo_weights:
        from model.demo_weights import DEMO_NOTICE, write_demo_weights

        log.warning("No weights configured — running on %s.", DEMO_NOTICE)
        kwargs |= write_demo_weights(settings.demo_weights_dir, settings.model.variant).loader_kwargs()
    model = load_minigpt4(**kwargs, progress=progress)
    log.info("%s", model_summary(model, settings))
    return model


def model_summary(model: MiniGPT4, settings: Settings) -> str:
    """One line: variant, device, dtype (and quantization), parameters, weights and KV-cache memory."""
    from model.report import describe_weights

    report = model.load_report
    weights = describe_weights(model, context_tokens=settings.generation.max_length)
    parameters = sum(part.parameters for part in weights.parts)
    where = f"{report.device}, {report.dtype}" if report else "?"
    if report and report.quantization != "none":
        where += f", {report.quantization}"
    demo = " (demo weights)" if demo_weights_in_use(settings) else ""
    return (
        f"model {report.variant if report else settings.model.variant}{demo} on {where}: "
        f"{_count(parameters)} parameters, {_size(weights.weights_bytes)} of weights, "
        f"{_size(weights.kv_bytes_per_thread)} KV cache per {weights.context_tokens}-token thread"
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _shared_fields(settings: EngineSettings, config_type: type) -> dict[str, Any]:
    """The ``[engine]`` values a config dataclass takes, by field name (one source of truth: bot.toml)."""
    names = {f.name for f in dataclasses.fields(config_type)}
    return settings.model_dump(include=names & EngineSettings.model_fields.keys())


def engine_config(settings: Settings) -> EngineConfig:
    """``EngineConfig`` (and its ``SchedulerConfig``) from ``[engine]``, field by name."""
    from model.engine import EngineConfig, SchedulerConfig

    scheduler = SchedulerConfig(**_shared_fields(settings.engine, SchedulerConfig))
    return EngineConfig(scheduler=scheduler, **_shared_fields(settings.engine, EngineConfig))


async def _create_local(settings: Settings, *, model: MiniGPT4 | None = None, **_ignored: Any) -> GenerationBackend:
    from model.engine import Engine
    from model.engine.local_backend import EngineBackend

    if model is None:
        model = await asyncio.to_thread(load_model, settings)
    engine = Engine(model, engine_config(settings)).start()
    return EngineBackend(
        engine, info={"demo": demo_weights_in_use(settings)}, timeout_s=settings.engine.request_timeout_s
    )


LOCAL = BackendPlugin(name="local", create=_create_local)
