"""One scripted generation backend for the core's, the web's and the adapters' tests (no torch work).

It speaks the real backend contract — ``model.engine.contract`` events and errors — so the core's type
dispatch is exercised exactly as with the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from model.engine.contract import FinalEvent, StreamArgs, TokenEvent, stream_method


class ScriptedBackend:
    """Streams ``answer`` in ``piece``-character tokens (``delay`` s apart), records each call, or raises ``fail``.

    ``script``: optional answers for the next calls, used first-in first-out before ``answer``: a text, or
    a list of the exact token texts to stream (as byte tokens decode: ``["a", "\\x00", "\\ud83d"]`` …).
    ``before_final``: awaited after the last token, before the final event (fault injection: e.g. restart
    the database just as the core stores the answer).
    """

    def __init__(self, answer: str = "A red circle.", *, piece: int = 0, delay: float = 0.0) -> None:
        self.answer, self.piece, self.delay = answer, piece, delay
        self.calls: list[dict[str, Any]] = []
        self.script: list[str | list[str]] = []
        self.fail: BaseException | None = None
        self.before_final: Callable[[], Awaitable[None]] | None = None
        self.closed = False

    @stream_method
    async def stream(self, args: StreamArgs) -> AsyncIterator[TokenEvent | FinalEvent]:
        self.calls.append({**args, "turns": list(args["turns"]), "images": list(args["images"]),
                           "options": dict(args["options"])})  # fmt: skip
        if self.fail is not None:
            raise self.fail
        scripted = self.script.pop(0) if self.script else self.answer
        text = scripted if isinstance(scripted, str) else "".join(scripted)
        if not isinstance(scripted, str):
            pieces = list(scripted)
        elif self.piece:
            pieces = [text[i : i + self.piece] for i in range(0, len(text), self.piece)]
        else:  # word by word, as the engine's detokenizer shows them
            words = text.split(" ")
            pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
        for i, piece in enumerate(pieces):
            if self.delay:
                await asyncio.sleep(self.delay)
            yield TokenEvent("r", i, i, piece)
        if self.before_final is not None:
            await self.before_final()
        completion = max(1, len(text) // 4) if self.piece else len(pieces)
        yield FinalEvent("r", "eos", text, tuple(range(completion)), 10, completion, 0, 0.0, 0.01, 0.02)

    def describe(self) -> dict[str, Any]:
        return {"variant": "vicuna0", "device": "cpu", "dtype": "float32", "demo": True}

    def stats(self) -> dict[str, Any]:
        return {"queue_depth": 0, "batch_size": 0}

    async def close(self) -> None:
        self.closed = True
