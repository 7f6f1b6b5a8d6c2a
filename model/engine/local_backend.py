"""The local generation backend: the engine behind the core's backend seam (``bot.core.backend_api.GenerationBackend``).

It speaks only the torch-free contract of :mod:`model.engine.contract`: it streams
:class:`~model.engine.contract.TokenEvent` then one :class:`~model.engine.contract.FinalEvent`, and raises
only :class:`~model.engine.contract.EngineError` subclasses — ``Busy``, ``RequestRejected`` (including
``RequestTooLarge`` and invalid ``[generation]`` options) and ``RequestFailed``, into which anything
unexpected is wrapped (and logged with its traceback).  What a person is told is the core's business.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from model.engine.contract import EngineError, FinalEvent, RequestFailed, StreamArgs, TokenEvent, stream_method
from model.engine.engine import Engine
from model.engine.types import EngineRequest
from model.generate import default_options

__all__ = ["EngineBackend"]

log = logging.getLogger(__name__)


class EngineBackend:
    """Streams answers from a running :class:`Engine`; ``describe`` feeds the ``settings`` command.

    ``info`` is merged into :meth:`describe` (e.g. ``{"demo": True}``); ``timeout_s`` bounds each
    request (its final event then says ``deadline``).  :meth:`close` stops the engine.
    """

    def __init__(self, engine: Engine, info: Mapping[str, Any] | None = None, timeout_s: float | None = None) -> None:
        self.engine = engine
        self.info = dict(info or {})
        self.timeout_s = timeout_s

    @stream_method
    async def stream(self, args: StreamArgs) -> AsyncIterator[TokenEvent | FinalEvent]:
        """One answer for a thread: token events, then the final event (see the module docstring for errors).

        ``options`` are the ``[generation]`` settings (``max_new_tokens``, ``num_beams``, ``do_sample``,
        ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``length_penalty``, ``min_length``,
        ``max_length``, ``seed`` …); the variant's stop strings are added.
        """
        conversation_id = args["conversation_id"]
        try:
            request = EngineRequest(
                turns=list(args["turns"]),
                images=list(args["images"]),
                options=default_options(self.engine.model, **args["options"]),
                conversation_id=conversation_id,
                user=args["user"],
                deadline_s=self.timeout_s,
            )
            events = self.engine.submit(request)
        except EngineError:
            raise
        except Exception as exc:
            raise self._failed("submitting", conversation_id, exc) from exc
        async with events:
            try:
                async for event in events:
                    yield event
            except EngineError:
                raise
            except Exception as exc:
                raise self._failed("streaming", conversation_id, exc) from exc

    def describe(self) -> dict[str, Any]:
        """Variant, device and dtype of the loaded model, plus ``info``."""
        model = self.engine.model
        report = model.load_report
        return {
            "variant": model.spec.name,
            "device": report.device if report is not None else str(model.device),
            "dtype": report.dtype if report is not None else str(model.llm_dtype).removeprefix("torch."),
            **self.info,
        }

    def stats(self) -> dict[str, Any]:
        """The engine's metrics snapshot (queue depth, batch size, tokens/s, TTFT, cache hit rates)."""
        return self.engine.snapshot()

    async def close(self) -> None:
        """Stop the engine (answers in flight end as ``aborted``), off the event loop."""
        await asyncio.to_thread(self.engine.stop)

    @staticmethod
    def _failed(stage: str, conversation_id: str, exc: Exception) -> RequestFailed:
        log.error("local backend failed %s an answer for conversation %s", stage, conversation_id, exc_info=exc)
        return RequestFailed(f"{stage} failed: {exc!r}")
