"""The MiniGPT-4 model stack: original checkpoints in, reference-identical numbers out.

``minigpt4`` (the model: encoding, prompts, context embeddings, ``forward``) · ``loader`` (original
files → model) · ``sampling`` (options, per-row sampler, streaming detokenizer) · ``generate`` (the
static-batch oracle, beam search, ``ChatSession``) · ``report`` (what was loaded, sizes) · ``engine``
(continuous batching behind the bot's backend seam).

Names are loaded on first use, so ``import model.engine.contract`` (the engine's torch-free contract,
imported by the bot core) does not pull in torch.
"""

from model._lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "model.checkpoints",
    "TEMPLATES": "model.conversation",
    "build_prompt": "model.conversation",
    "clean_answer": "model.conversation",
    "ChatSession": "model.generate",
    "ChatTurnResult": "model.generate",
    "ChatTurn": "model.engine.contract",
    "GenerationResult": "model.generate",
    "TokenStep": "model.generate",
    "beam_search": "model.generate",
    "decode_answer": "model.generate",
    "default_options": "model.generate",
    "generate_ids": "model.generate",
    "stream_answer": "model.generate",
    "stream_ids": "model.generate",
    "PrecisionError": "model.loader",
    "load_minigpt4": "model.loader",
    "MiniGPT4": "model.minigpt4",
    "VisionOutputs": "model.minigpt4",
    "LoadReport": "model.report",
    "PartReport": "model.report",
    "WeightsReport": "model.report",
    "describe_weights": "model.report",
    "GenerationOptions": "model.sampling",
    "IncrementalDetokenizer": "model.sampling",
    "InvalidGenerationOptions": "model.sampling",
    "RowSampler": "model.sampling",
    "VARIANTS": "model.variants",
    "VariantSpec": "model.variants",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
