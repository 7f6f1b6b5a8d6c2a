"""What the core needs from a model backend; ``model.engine.backend.EngineBackend`` provides it.

The core never imports torch: it talks to this protocol, and events are recognised by
their attributes (a final event has ``finish_reason``).  Backpressure errors carry
``retry_after_s``; per-request failures carry ``user_message``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

__all__ = ["GenerationBackend"]


class GenerationBackend(Protocol):
    """Streams one answer for a thread's turns and images."""

    def stream(
        self,
        *,
        turns: Sequence[dict[str, Any]],
        images: Sequence[bytes],
        conversation_id: str,
        user: str,
        options: dict[str, Any],
    ) -> AsyncIterator[Any]:
        """Yield events with ``.text`` (deltas); the last has ``finish_reason``, ``prompt_tokens``,
        ``completion_tokens`` and ``ttft_s``.  Raise an error with ``retry_after_s`` when busy."""
        ...

    def describe(self) -> dict[str, Any]:
        """Model facts for the ``settings`` command (variant, weights, device, dtype)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Engine metrics (queue depth, batch size, tokens/s …) for /metrics."""
        ...
