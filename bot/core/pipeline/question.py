"""What is asked, and how: the request's answer options (:class:`Options`, checked first, before anything
is read, stored or charged) and the question sent to the model (:class:`Presets`: a preset's prompt, the
user's words, or the default preset for a bare picture)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from bot.core.errors import UserInputError
from bot.core.pipeline.chain import Context, Handler, Parts
from bot.core.requests import GenerationRequest, ReplyEvent
from bot.core.sanitize import clean_text

__all__ = ["STOP_LIMITS", "Options", "Presets", "generation_options"]

STOP_LIMITS = (4, 64)
"""At most this many stop strings per request, of at most this many characters (OpenAI's own count limit)."""


def generation_options(settings: Any, wanted: GenerationRequest | None) -> dict[str, Any]:
    """The backend options for one request: ``[generation]`` with the request's choices, each checked against
    ``[generation]``'s bounds (:class:`~bot.core.requests.GenerationRequest`); a bad one is a
    :class:`UserInputError` raised before anything is stored or charged."""
    options = settings.model_dump()
    if wanted is None:
        return options
    if (n := wanted.max_new_tokens) is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= settings.max_new_tokens:
            raise UserInputError(f"The answer length must be 1 to {settings.max_new_tokens} tokens here (got {n}).")
        options["max_new_tokens"] = n
    if (t := wanted.temperature) is not None:
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 5:
            raise UserInputError(f"The temperature must be between 0 and 5 (got {t}).")
        options["do_sample"] = t > 0  # 0: greedy, as OpenAI-style clients mean it
        if t > 0:
            options["temperature"] = float(t)
    if (p := wanted.top_p) is not None:
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise UserInputError(f"top_p must be above 0 and at most 1 (got {p}).")
        options["top_p"] = float(p)
    count, length = STOP_LIMITS
    if wanted.stop:
        if len(wanted.stop) > count or not all(isinstance(x, str) and 1 <= len(x) <= length for x in wanted.stop):
            raise UserInputError(f"Give at most {count} stop strings of 1 to {length} characters each.")
        options["stop_sequences"] = list(wanted.stop)  # added to the model's own stop strings by the backend
    if (seed := wanted.seed) is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise UserInputError(f"The seed must be a whole number from 0 to 2^63 - 1 (got {seed}).")
        options["seed"] = seed
    return options


class Options:
    """``ctx.options``: the backend options of this request (:func:`generation_options`)."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    async def __call__(self, ctx: Context, call_next: Handler) -> AsyncGenerator[ReplyEvent, None]:
        ctx.options = generation_options(self.parts.settings.generation, ctx.request.generation)
        async with aclosing(call_next(ctx)) as events:
            async for event in events:
                yield event


class Presets:
    """``ctx.question``: the text the model is asked (:meth:`~bot.core.presets.PresetBook.question`); a
    message with neither a question nor a new picture is asked what the user wants to know."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    async def __call__(self, ctx: Context, call_next: Handler) -> AsyncGenerator[ReplyEvent, None]:
        r = ctx.request
        # Preset prompts come from bot.toml, where "\u0000" is valid TOML: clean what is stored and sent.
        ctx.question = clean_text(self.parts.presets.question(ctx.parsed, bool(ctx.checked), r.workspace, r.channel))
        if not ctx.question and not ctx.checked:
            raise UserInputError("What would you like to know about the picture?")
        async with aclosing(call_next(ctx)) as events:
            async for event in events:
                yield event
