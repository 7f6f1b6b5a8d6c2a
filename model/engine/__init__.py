"""The shared inference engine: continuous batching, streaming, image and KV-prefix reuse, backpressure.

``api`` (torch-free) is the contract both the engine and the bot core import: the events a request
streams and the errors it raises.  ``scheduler`` (plain Python, no tensors) decides; ``runner``
(tensors, KV cache) executes; ``engine`` connects them to asyncio callers through one worker thread;
``backend`` (:class:`EngineBackend`) is the engine behind the bot core's backend seam.
Names are loaded on first use, so importing ``model.engine.api`` loads no torch.
"""

from model._lazy import lazy_exports

_EXPORTS = {
    "Busy": "model.engine.api",
    "ChatTurn": "model.engine.api",
    "EngineError": "model.engine.api",
    "FinalEvent": "model.engine.api",
    "FinishReason": "model.engine.api",
    "RequestFailed": "model.engine.api",
    "RequestRejected": "model.engine.api",
    "RequestTooLarge": "model.engine.api",
    "TokenEvent": "model.engine.api",
    "EngineBackend": "model.engine.backend",
    "Engine": "model.engine.engine",
    "EngineConfig": "model.engine.engine",
    "RequestStream": "model.engine.engine",
    "Scheduler": "model.engine.scheduler",
    "SchedulerConfig": "model.engine.scheduler",
    "SeqInfo": "model.engine.scheduler",
    "StepPlan": "model.engine.scheduler",
    "StepResult": "model.engine.scheduler",
    "EngineRequest": "model.engine.types",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
