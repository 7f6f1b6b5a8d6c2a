"""The backend seam: what the core needs from whatever generates answers, and how backends are found.

A backend streams the events of :mod:`model.engine.contract` — the engine's torch-free contract, which
both sides import — and raises only its errors (``Busy``, ``RequestRejected``, ``RequestFailed``).
The core dispatches on those types (:meth:`bot.core.service.BotService._stream`), so a backend never
decides what a user is told.  The local engine (``model.engine.local_backend.EngineBackend``) implements
this; Ray Serve and vLLM backends plug in the same way, chosen by ``[engine] backend`` through the
entry-point group ``minigpt4_bot.backends`` (:mod:`bot.core.plugins`).

A backend owns its ``bot.toml`` table the way a front end does: :attr:`BackendPlugin.settings` is a
pydantic model, the table is named after the plugin (``[ray]``, ``[vllm]``), ``load_settings``
validates it with every other table (all errors reported together) and
:meth:`bot.core.config.Settings.backend` returns it.  The core knows no backend's settings: adding a
backend touches no file of ``bot/core``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Unpack, runtime_checkable

from pydantic import BaseModel, ConfigDict

from model.engine.contract import ChatTurn, FinalEvent, StreamArgs, TokenEvent

if TYPE_CHECKING:
    from bot.core.config import Settings

__all__ = ["BackendPlugin", "BackendSettings", "ChatTurn", "GenerationBackend", "StreamArgs"]


@runtime_checkable
class GenerationBackend(Protocol):
    """Streams one answer for a thread's turns and pictures."""

    def stream(self, **args: Unpack[StreamArgs]) -> AsyncIterator[TokenEvent | FinalEvent]:
        """Token events, then one final event, for ``turns``, ``images``, ``conversation_id``, ``user`` and
        ``options`` (:class:`~model.engine.contract.StreamArgs` says what each is).  Raises
        ``model.engine.contract.EngineError`` subclasses only.  The core closes the iterator (``aclose``,
        where it has one) when the reply ends early: that must cancel the request."""
        ...

    def describe(self) -> dict[str, Any]:
        """Model facts for the ``settings`` command and health (variant, device, dtype, demo)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Engine gauges (queue depth, batch size, tokens/s, cache hit rates) for /metrics."""
        ...

    async def close(self) -> None:
        """Stop generating (answers in flight end as aborted) and free the resources."""
        ...


class BackendSettings(BaseModel):
    """Base of a backend's ``bot.toml`` table (named after the backend); unknown keys are errors.

    A backend without settings of its own (``local`` reads ``[engine]``) keeps this empty model.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class BackendPlugin:
    """The entry-point object of a backend: ``create(settings, **overrides)`` builds and starts it.

    Overrides are keyword arguments the entry layer may pass (the local backend takes an already
    loaded ``model=``); a backend ignores the ones it does not know.  ``settings`` validates the
    backend's own table (``settings.backend(name)`` returns it).
    """

    name: str
    create: Callable[..., Awaitable[GenerationBackend]]
    settings: type[BackendSettings] = BackendSettings

    async def start(self, settings: Settings, **overrides: Any) -> GenerationBackend:
        return await self.create(settings, **overrides)
