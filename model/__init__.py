"""The MiniGPT-4 model stack: original checkpoints in, reference-identical numbers out."""

from model.checkpoints import CheckpointError
from model.conversation import TEMPLATES, Turn, build_prompt, clean_answer
from model.generation import GenerationOptions, GenerationResult, InvalidGenerationOptions
from model.loader import LoadReport, PrecisionError, load_minigpt4
from model.minigpt4 import MiniGPT4, VisionOutputs
from model.variants import VARIANTS, VariantSpec

__all__ = [
    "TEMPLATES",
    "VARIANTS",
    "CheckpointError",
    "GenerationOptions",
    "GenerationResult",
    "InvalidGenerationOptions",
    "LoadReport",
    "MiniGPT4",
    "PrecisionError",
    "Turn",
    "VariantSpec",
    "VisionOutputs",
    "build_prompt",
    "clean_answer",
    "load_minigpt4",
]
