"""The built-in generation backend: the local engine on this machine's model (entry point ``local``).

It lives in the entry layer because building it means loading weights (``model``) from the core's
settings (``bot.core``); the core only sees the :class:`~bot.core.backend.GenerationBackend` it returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bot.core.backend import BackendPlugin, GenerationBackend
from bot.core.config import EngineSettings, Settings

if TYPE_CHECKING:
    from model import MiniGPT4
    from model.engine import EngineConfig

__all__ = ["LOCAL", "engine_config", "load_model"]

log = logging.getLogger(__name__)


def load_model(settings: Settings, progress: Callable[[str, int], None] | None = None) -> MiniGPT4:
    """Load the configured weights, writing tiny demo weights first when none are configured."""
    from model import load_minigpt4

    kwargs: dict[str, Any] = settings.model.loader_kwargs()
    if settings.model.uses_demo_weights:
        from model.demo_weights import DEMO_NOTICE, write_demo_weights

        log.warning("No weights configured — %s.", DEMO_NOTICE)
        kwargs |= write_demo_weights(settings.demo_weights_dir, settings.model.variant).loader_kwargs()
    return load_minigpt4(**kwargs, progress=progress)


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
    from model.engine.backend import EngineBackend

    if model is None:
        model = await asyncio.to_thread(load_model, settings)
    engine = Engine(model, engine_config(settings)).start()
    return EngineBackend(
        engine, info={"demo": settings.model.uses_demo_weights}, timeout_s=settings.engine.request_timeout_s
    )


LOCAL = BackendPlugin(name="local", create=_create_local)
