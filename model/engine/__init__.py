"""The shared inference engine: continuous batching, streaming, image and KV-prefix reuse, backpressure.

``scheduler`` (plain Python, no tensors) decides; ``runner`` (tensors, KV cache) executes;
``engine`` connects them to asyncio callers through one worker thread.
"""

from model.engine.engine import Engine, EngineConfig, RequestStream
from model.engine.scheduler import Busy, RequestTooLarge, Scheduler, SchedulerConfig, SeqInfo, StepPlan, StepResult
from model.engine.types import EngineRequest, FinalEvent, RequestFailed, TokenEvent

__all__ = [
    "Busy",
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "FinalEvent",
    "RequestFailed",
    "RequestStream",
    "RequestTooLarge",
    "Scheduler",
    "SchedulerConfig",
    "SeqInfo",
    "StepPlan",
    "StepResult",
    "TokenEvent",
]
