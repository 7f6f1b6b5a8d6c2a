"""The tokenizer side of MiniGPT-4, without the model: prompt segments in, answer text out.

:class:`~model.minigpt4.MiniGPT4` uses it, and so does a backend that only needs the text side
(``bot/cli/vllm_backend.py`` tokenises prompts for vLLM and decodes the ids it streams back): one
implementation, so the ids sent to vLLM and the text shown are the local engine's exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.conversation import IMAGE_PLACEHOLDER

__all__ = ["TextCodec"]


class TextCodec:
    """A LLaMA tokenizer (and its SentencePiece model, when there is one) as the reference uses them."""

    def __init__(self, tokenizer: Any, spm_file: str | None = None) -> None:
        self.tokenizer = tokenizer
        self._sp = None
        if spm_file:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=spm_file)
        self.bos_id = int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 1)
        self.eos_id = int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 2)

    @classmethod
    def from_dir(cls, folder: str | Path) -> TextCodec:
        """The tokenizer of an LLM (or exported model) folder, loaded as :mod:`model.loader` loads it."""
        from transformers import AutoTokenizer

        folder = Path(folder).expanduser()
        if _model_type(folder) == "minigpt4":  # an exported folder: AutoTokenizer looks its model_type up
            from model.vllm_plugin.configuration import register_config

            register_config()
        spm = folder / "tokenizer.model"
        # legacy=True: the reference's slow SentencePiece tokenizer (`[INST]` after `<s>` → `▁[`, `INST`, `]`).
        return cls(AutoTokenizer.from_pretrained(folder, legacy=True), str(spm) if spm.is_file() else None)

    def segment_token_ids(self, prompt: str) -> list[list[int]]:
        """Split at ``<ImageHere>`` and tokenise each segment separately, BOS on the first only."""
        return [
            self.tokenizer(segment, add_special_tokens=(i == 0)).input_ids
            for i, segment in enumerate(prompt.split(IMAGE_PLACEHOLDER))
        ]

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids → text without special tokens, as the reference's slow tokenizer decodes.

        With a SentencePiece ``tokenizer.model`` the pieces are decoded by SentencePiece itself
        (as transformers 4.30's slow ``LlamaTokenizer`` did): an invalid byte sequence from
        byte-fallback pieces becomes one U+FFFD, where the fast decoder would emit one per byte.
        """
        if self._sp is None:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)
        special = set(self.tokenizer.all_special_ids)
        size = self._sp.get_piece_size()
        return self._sp.decode([i for i in ids if i not in special and 0 <= i < size])


def _model_type(folder: Path) -> str | None:
    """``model_type`` of the folder's ``config.json`` (``None`` without a readable one)."""
    try:
        value = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
