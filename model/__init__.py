"""The MiniGPT-4 model stack: original checkpoints in, reference-identical numbers out.

Names are loaded on first use, so ``import model.engine.api`` (the engine's torch-free contract,
imported by the bot core) does not pull in torch.
"""

from model._lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "model.checkpoints",
    "TEMPLATES": "model.conversation",
    "Turn": "model.conversation",
    "build_prompt": "model.conversation",
    "clean_answer": "model.conversation",
    "GenerationOptions": "model.generation",
    "GenerationResult": "model.generation",
    "InvalidGenerationOptions": "model.generation",
    "LoadReport": "model.loader",
    "PrecisionError": "model.loader",
    "load_minigpt4": "model.loader",
    "MiniGPT4": "model.minigpt4",
    "VisionOutputs": "model.minigpt4",
    "VARIANTS": "model.variants",
    "VariantSpec": "model.variants",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
