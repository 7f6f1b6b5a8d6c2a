"""The MiniGPT-4 model stack: original checkpoints in, reference-identical numbers out.

``minigpt4`` (the model: encoding, prompts, context embeddings, ``forward``) · ``loader`` (original
files → model) · ``sampling`` (options, per-row sampler, streaming detokenizer) · ``generate`` (the
static-batch oracle, beam search, ``ChatSession``) · ``report`` (what was loaded, sizes) · ``engine``
(continuous batching behind the bot's backend seam).

Names are loaded on first use, so ``import model.engine.contract`` (the engine's torch-free contract,
imported by the bot core) does not pull in torch.
"""

from model._lazy import by_module, lazy_exports

_EXPORTS = by_module(
    {
        "model.checkpoints": ("CheckpointError",),
        "model.conversation": ("TEMPLATES", "build_prompt", "clean_answer"),
        "model.generate": (
            "ChatSession",
            "ChatTurnResult",
            "GenerationResult",
            "TokenStep",
            "beam_search",
            "decode_answer",
            "default_options",
            "generate_ids",
            "stream_answer",
            "stream_ids",
        ),
        "model.engine.contract": ("ChatTurn",),
        "model.loader": ("PrecisionError", "load_minigpt4"),
        "model.minigpt4": ("MiniGPT4", "VisionOutputs"),
        "model.report": ("LoadReport", "PartReport", "WeightsReport", "describe_weights"),
        "model.sampling": ("GenerationOptions", "IncrementalDetokenizer", "InvalidGenerationOptions", "RowSampler"),
        "model.variants": ("VARIANTS", "VariantSpec"),
    }
)
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
