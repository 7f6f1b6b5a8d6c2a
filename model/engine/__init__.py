"""The shared inference engine: continuous batching, streaming, image and KV-prefix reuse, backpressure.

``api`` (torch-free) is the contract both the engine and the bot core import: the events a request
streams and the errors it raises.  ``scheduler`` (plain Python, no tensors) decides; ``runner``
(tensors, KV cache) executes; ``engine`` connects them to asyncio callers through one worker thread;
``backend`` (:class:`EngineBackend`) is the engine behind the bot core's backend seam.
Names are loaded on first use, so importing ``model.engine.contract`` loads no torch.
"""

from model._lazy import lazy_exports

_EXPORTS = {
    "Busy": "model.engine.contract",
    "ChatTurn": "model.engine.contract",
    "EngineError": "model.engine.contract",
    "FinalEvent": "model.engine.contract",
    "FinishReason": "model.engine.contract",
    "RequestFailed": "model.engine.contract",
    "RequestRejected": "model.engine.contract",
    "RequestTooLarge": "model.engine.contract",
    "TokenEvent": "model.engine.contract",
    "EngineBackend": "model.engine.local_backend",
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
