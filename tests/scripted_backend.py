"""One scripted generation backend for the core's, the web's and the adapters' tests (no torch work).

It speaks the real backend contract — ``model.engine.api`` events and errors — so the core's type
dispatch is exercised exactly as with the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from model.engine.api import ChatTurn, FinalEvent, TokenEvent


class ScriptedBackend:
    """Streams ``answer`` in ``piece``-character tokens (``delay`` s apart), records each call, or raises ``fail``.

    ``script``: optional texts for the next answers, used first-in first-out before ``answer``.
    """

    def __init__(self, answer: str = "A red circle.", *, piece: int = 0, delay: float = 0.0) -> None:
        self.answer, self.piece, self.delay = answer, piece, delay
        self.calls: list[dict[str, Any]] = []
        self.script: list[str] = []
        self.fail: BaseException | None = None
        self.closed = False

    async def stream(
        self,
        *,
        turns: Sequence[ChatTurn],
        images: Sequence[bytes],
        conversation_id: str,
        user: str,
        options: Mapping[str, Any],
    ) -> AsyncIterator[TokenEvent | FinalEvent]:
        self.calls.append(
            {"turns": list(turns), "images": list(images), "conversation_id": conversation_id, "user": user,
             "options": dict(options)}
        )  # fmt: skip
        if self.fail is not None:
            raise self.fail
        text = self.script.pop(0) if self.script else self.answer
        pieces = [text[i : i + self.piece] for i in range(0, len(text), self.piece)] if self.piece else None
        if pieces is None:  # word by word, as the engine's detokenizer shows them
            words = text.split(" ")
            pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
        for i, piece in enumerate(pieces):
            if self.delay:
                await asyncio.sleep(self.delay)
            yield TokenEvent("r", i, i, piece)
        completion = max(1, len(text) // 4) if self.piece else len(pieces)
        yield FinalEvent("r", "eos", text, tuple(range(completion)), 10, completion, 0, 0.0, 0.01, 0.02)

    def describe(self) -> dict[str, Any]:
        return {"variant": "vicuna0", "device": "cpu", "dtype": "float32", "demo": True}

    def stats(self) -> dict[str, Any]:
        return {"queue_depth": 0, "batch_size": 0}

    async def close(self) -> None:
        self.closed = True
