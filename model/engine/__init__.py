"""The shared inference engine: continuous batching, streaming, image and KV-prefix reuse, backpressure.

``contract`` (torch-free) is what both the engine and the bot core import: the events a request
streams and the errors it raises; the package exports all of it.  ``scheduler`` (plain Python, no
tensors) decides; ``runner`` (tensors, KV cache) executes; ``engine`` connects them to asyncio callers
through one worker thread; ``local_backend`` (:class:`EngineBackend`) is the engine behind the bot core's backend seam.
Names are loaded on first use, so importing ``model.engine.contract`` loads no torch.
"""

from model._lazy import by_module, lazy_exports
from model.engine import contract

_EXPORTS = by_module(
    {
        "model.engine.contract": contract.__all__,  # the whole torch-free contract
        "model.engine.local_backend": ("EngineBackend",),
        "model.engine.engine": ("Engine", "EngineConfig", "RequestStream"),
        "model.engine.scheduler": ("Scheduler", "SchedulerConfig", "SeqInfo", "StepPlan", "StepResult"),
        "model.engine.types": ("EngineRequest",),
    }
)
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
