"""The engine as the bot core's generation backend (``bot.core.backend.GenerationBackend``, by duck typing)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from model.engine.engine import Engine
from model.engine.types import EngineRequest, FinalEvent, TokenEvent

__all__ = ["EngineBackend"]


class EngineBackend:
    """Streams answers from a running :class:`Engine`; ``describe`` feeds the ``settings`` command."""

    def __init__(self, engine: Engine, info: dict[str, Any] | None = None, timeout_s: float | None = None) -> None:
        self.engine = engine
        self.info = info or {}
        self.timeout_s = timeout_s

    async def stream(
        self,
        *,
        turns: Sequence[dict[str, Any]],
        images: Sequence[bytes],
        conversation_id: str,
        user: str,
        options: dict[str, Any],
    ) -> AsyncIterator[TokenEvent | FinalEvent]:
        opts = self.engine.model.default_options(**options)
        request = EngineRequest(
            turns=list(turns),
            images=list(images),
            options=opts,
            conversation_id=conversation_id,
            user=user,
            deadline_s=self.timeout_s,
        )
        async with self.engine.submit(request) as events:
            async for event in events:
                yield event

    def describe(self) -> dict[str, Any]:
        model = self.engine.model
        report = getattr(model, "load_report", None)
        return {
            "variant": model.spec.name,
            "device": getattr(report, "device", str(model.device)),
            "dtype": getattr(report, "dtype", str(model.llm_dtype)),
            **self.info,
        }

    def stats(self) -> dict[str, Any]:
        return self.engine.snapshot()
