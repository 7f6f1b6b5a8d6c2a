"""A multi-image chat session on one model: the reference ``Chat`` without its single-image limit.

Each uploaded image is encoded once (projected visual tokens are kept, as ``Chat.encode_img``
does); every turn renders the full prompt and splices the stored image tokens in again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image

from model.conversation import Turn
from model.generation import GenerationOptions, GenerationResult
from model.image_processing import load_image
from model.minigpt4 import MiniGPT4

__all__ = ["ChatSession", "ChatTurnResult"]


@dataclass
class ChatTurnResult:
    """What the last :meth:`ChatSession.ask` produced."""

    prompt: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""


class ChatSession:
    """Conversation state for one user: turns, image tokens, and answers streamed as text."""

    def __init__(self, model: MiniGPT4, options: GenerationOptions | None = None) -> None:
        self.model = model
        self.options = options or model.default_options()
        self.turns: list[Turn] = []
        self.images: list[torch.Tensor] = []
        self._pending_images = 0
        self.last = ChatTurnResult()

    def reset(self) -> None:
        """Forget the conversation (the model stays loaded)."""
        self.turns.clear()
        self.images.clear()
        self._pending_images = 0

    def add_image(self, image: Image.Image | bytes | str) -> None:
        """Decode and encode an image now (PIL image, raw bytes or a path); it joins with the next question.

        Raises :class:`model.image_processing.ImageDecodeError` for input that is not an image.
        """
        self.images.append(self.model.encode_pil([load_image(image)])[0])
        self._pending_images += 1

    @property
    def has_image(self) -> bool:
        return bool(self.images)

    def ask(self, text: str, options: GenerationOptions | None = None) -> Iterator[str]:
        """Add the question, stream the answer's text deltas, then record the cleaned answer."""
        opts = options or self.options
        for _ in range(max(0, self._pending_images - 1)):
            self.turns.append(Turn("user", "", image=True))
        self.turns.append(Turn("user", text, image=self._pending_images > 0))
        self._pending_images = 0
        prompt = self.model.build_prompt(self.turns)
        context = self.model.context_embeddings(prompt, self.images)
        result = GenerationResult()
        yield from self.model.stream_answer(context, opts, result)
        answer = self.model.decode_answer(result.token_ids)
        self.turns.append(Turn("assistant", answer))
        self.last = ChatTurnResult(prompt, answer, result.token_ids, result.finish_reason)
