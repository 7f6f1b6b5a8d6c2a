"""Token generation with the reference's options, per-row stops, streaming and batching.

Reference: ``Chat.answer_prepare`` / ``Chat.model_generate`` (transformers 4.30
``generate(inputs_embeds=…)``) and ``MiniGPTBase.generate`` (left padding + mask).

What is reproduced exactly, and why it needs care:

* transformers 4.30 seeds the output with a BOS *placeholder* when generating from
  embeddings.  It is never fed to the model, but the repetition penalty and
  ``min_length`` see it: the penalty applies to ``{BOS} ∪ generated`` (never the prompt)
  and ``min_length=m`` forbids EOS only while ``1 + generated < m``.
* Logits processors run in transformers' order — repetition penalty, min-length, then for
  sampling temperature → top-k (50, transformers' default the reference inherits) →
  top-p — using transformers' own processor classes.
* ``max_length`` cuts the context embeddings from the *left* when
  ``len(context) + max_new_tokens > max_length`` (``answer_prepare``).
* Unlike the reference, whose stop check needs *every* row to end with a stop sequence,
  each row here stops on its own EOS / stop ids / stop strings / token budget.

Batched rows are left-padded with zero embeddings and masked, with position ids counted
from each row's first real token, so a row's greedy ids equal its unbatched ids.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicCache

__all__ = [
    "GenerationOptions",
    "GenerationResult",
    "IncrementalDetokenizer",
    "InvalidGenerationOptions",
    "RowSampler",
    "TokenStep",
    "beam_search",
    "decode_batch",
    "truncate_left",
]


class InvalidGenerationOptions(ValueError):
    """A generation option is out of range; the message names the option and the range."""


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling options; defaults are the reference ``Chat.answer_prepare`` defaults."""

    max_new_tokens: int = 300
    do_sample: bool = True
    num_beams: int = 1
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.05
    length_penalty: float = 1.0
    min_length: int = 1
    max_length: int = 2000
    stop_token_ids: tuple[tuple[int, ...], ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    # option: (low, high, low-inclusive) — the ranges the reference demos expose, a little wider
    _RANGES: ClassVar[dict[str, tuple[float, float, bool]]] = {
        "max_new_tokens": (1, 8192, True),
        "num_beams": (1, 10, True),
        "temperature": (0.0, 5.0, False),
        "top_p": (0.0, 1.0, False),
        "top_k": (0, 100_000, True),
        "repetition_penalty": (0.0, 10.0, False),
        "length_penalty": (-10.0, 10.0, True),
        "min_length": (0, 8192, True),
        "max_length": (2, 1_000_000, True),
    }

    @classmethod
    def create(cls, **overrides: Any) -> GenerationOptions:
        """Build validated options, ignoring ``None`` values (so callers can pass optional flags)."""
        known = {f.name for f in fields(cls)} | {"stop_sequences"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InvalidGenerationOptions(f"unknown generation option(s): {', '.join(unknown)}")
        values = {k: v for k, v in overrides.items() if v is not None}
        # `stop_sequences` (a common name) may hold strings, token-id lists, or both.
        for seq in values.pop("stop_sequences", None) or ():
            key = "stop_strings" if isinstance(seq, str) else "stop_token_ids"
            values[key] = (*values.get(key, ()), seq)
        for key in ("stop_token_ids",):
            if key in values:
                values[key] = tuple(tuple(int(i) for i in seq) for seq in values[key])
        if "stop_strings" in values:
            values["stop_strings"] = tuple(values["stop_strings"])
        options = replace(cls(), **values)
        options.validate()
        return options

    def validate(self) -> None:
        """Raise ``InvalidGenerationOptions`` for the first out-of-range option."""
        for name, (low, high, inclusive) in self._RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidGenerationOptions(f"{name} must be a number, got {value!r}")
            ok = (low <= value if inclusive else low < value) and value <= high
            if not ok:
                bracket = "[" if inclusive else "("
                raise InvalidGenerationOptions(f"{name} must be in {bracket}{low}, {high}], got {value}")
        if self.max_length <= self.max_new_tokens:
            raise InvalidGenerationOptions(
                f"max_length ({self.max_length}) must exceed max_new_tokens ({self.max_new_tokens}); "
                "it bounds context + answer"
            )
        if any(len(seq) == 0 for seq in self.stop_token_ids) or any(not s for s in self.stop_strings):
            raise InvalidGenerationOptions("stop sequences must not be empty")


@dataclass(frozen=True)
class TokenStep:
    """One generated token of one row; ``finish_reason`` is set on the row's last token."""

    row: int
    token_id: int
    finish_reason: str | None = None  # "eos" | "stop" | "length"


@dataclass
class GenerationResult:
    """The generated ids of one row (stop ids and EOS included, as transformers returns them)."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0
    truncated_tokens: int = 0


def truncate_left(context: torch.Tensor, max_new_tokens: int, max_length: int) -> tuple[torch.Tensor, int]:
    """Cut ``Tensor[L, H]`` from the left so that ``L + max_new_tokens <= max_length`` (reference rule)."""
    begin = max(0, context.shape[0] + max_new_tokens - max_length)
    return context[begin:], begin


class RowSampler:
    """Chooses the next token of one row from its logits, exactly as transformers 4.30 would."""

    def __init__(self, options: GenerationOptions, bos_id: int, eos_ids: Sequence[int], device: torch.device):
        self.options = options
        self.eos_ids = list(eos_ids)
        self.history: list[int] = [bos_id]  # the 4.30 BOS placeholder, then generated ids
        self.processors: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = []
        if options.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
        self.warpers: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = []
        if options.do_sample:
            if options.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(options.temperature))
            if options.top_k:
                self.warpers.append(TopKLogitsWarper(options.top_k))
            if options.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(options.top_p))
        self.generator: torch.Generator | None = None
        if options.do_sample and options.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(options.seed)

    @property
    def generated(self) -> list[int]:
        return self.history[1:]

    def next_token(self, logits: torch.Tensor) -> int:
        """``logits``: ``Tensor[V]`` for this row's last position."""
        scores = logits.float().unsqueeze(0).clone()  # [1, V]; a copy: the caller's logits stay intact
        ids = torch.tensor([self.history], device=scores.device)
        for processor in self.processors:
            scores = processor(ids, scores)
        if len(self.history) < self.options.min_length:
            scores[:, self.eos_ids] = -float("inf")
        if self.options.do_sample:
            for warper in self.warpers:
                scores = warper(ids, scores)
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator).item())
        else:
            token = int(scores.argmax(dim=-1).item())
        self.history.append(token)
        return token

    def finish_reason(self, decode_tail: Callable[[list[int]], str] | None) -> str | None:
        """Why this row is done after its latest token, or ``None`` to continue."""
        generated = self.generated
        if generated[-1] in self.eos_ids:
            return "eos"
        for seq in self.options.stop_token_ids:
            if tuple(generated[-len(seq) :]) == seq:
                return "stop"
        if self.options.stop_strings and decode_tail is not None:
            tail = decode_tail(generated[-16:])
            if any(s in tail for s in self.options.stop_strings):
                return "stop"
        if len(generated) >= self.options.max_new_tokens:
            return "length"
        return None


@torch.inference_mode()
def decode_batch(
    llm: Any,
    contexts: Sequence[torch.Tensor],
    samplers: Sequence[RowSampler],
    *,
    decode_tail: Callable[[list[int]], str] | None = None,
) -> Iterator[list[TokenStep]]:
    """Prefill the left-padded batch of ``Tensor[L_i, H]`` contexts, then decode step by step.

    Yields, after every decode step, the tokens of the rows still running.  Finished rows
    stay in the KV batch (fed their last token) but produce nothing more; the loop ends
    when every row has finished.
    """
    embed = llm.get_input_embeddings()
    batch = len(contexts)
    hidden = contexts[0].shape[-1]
    longest = max(c.shape[0] for c in contexts)
    device, dtype = contexts[0].device, contexts[0].dtype
    embeds = torch.zeros(batch, longest, hidden, dtype=dtype, device=device)
    mask = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for i, ctx in enumerate(contexts):
        embeds[i, longest - ctx.shape[0] :] = ctx
        mask[i, longest - ctx.shape[0] :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    cache = DynamicCache()
    out = llm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    next_pos = positions[:, -1:] + 1  # [B, 1]
    running = [True] * batch
    last = [0] * batch
    while True:
        logits = out.logits[:, -1, :]  # [B, V]
        steps: list[TokenStep] = []
        for row in range(batch):
            if not running[row]:
                continue
            token = samplers[row].next_token(logits[row])
            last[row] = token
            reason = samplers[row].finish_reason(decode_tail)
            if reason is not None:
                running[row] = False
            steps.append(TokenStep(row, token, reason))
        yield steps
        if not any(running):
            return
        tokens = torch.tensor(last, device=device).unsqueeze(1)  # [B, 1]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
        out = llm(
            inputs_embeds=embed(tokens).to(dtype),
            attention_mask=mask,
            position_ids=next_pos,
            cache=cache,
            use_cache=True,
        )
        next_pos = next_pos + 1


@torch.inference_mode()
def beam_search(
    llm: Any, context: torch.Tensor, options: GenerationOptions, bos_id: int, eos_ids: Sequence[int]
) -> GenerationResult:
    """``num_beams > 1``: one request at a time through transformers' ``generate`` (slower, no streaming)."""
    generator_kwargs: dict[str, Any] = dict(
        inputs_embeds=context.unsqueeze(0),
        attention_mask=torch.ones(1, context.shape[0], dtype=torch.long, device=context.device),
        max_new_tokens=options.max_new_tokens,
        min_new_tokens=max(0, options.min_length - 1),
        num_beams=options.num_beams,
        do_sample=options.do_sample,
        repetition_penalty=options.repetition_penalty,
        length_penalty=options.length_penalty,
        eos_token_id=list(eos_ids),
        pad_token_id=eos_ids[0],
        bos_token_id=bos_id,
    )
    if options.do_sample:
        generator_kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
        if options.seed is not None:
            torch.manual_seed(options.seed)
    with warnings.catch_warnings():
        # Penalising generated tokens only is exactly the reference's behaviour with inputs_embeds.
        warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
        ids = llm.generate(**generator_kwargs)[0].tolist()
    result = GenerationResult(prompt_tokens=context.shape[0])
    for i, token in enumerate(ids):
        result.token_ids.append(token)
        if token in eos_ids:
            result.finish_reason = "eos"
            break
        if any(tuple(ids[: i + 1][-len(seq) :]) == seq for seq in options.stop_token_ids):
            result.finish_reason = "stop"
            break
    return result


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas safe to show while streaming.

    Holds back an incomplete UTF-8 character (byte-fallback pieces decode to U+FFFD until
    complete), any tail that could still become a stop string such as Vicuna's ``###``,
    and leading whitespace (the reference strips the final answer).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ("###",)):
        self._decode = decode
        self._stops = tuple(stop_strings)
        self.ids: list[int] = []
        self.emitted = ""

    def _visible(self, final: bool) -> str:
        text = self._decode(self.ids).lstrip()
        for stop in self._stops:
            text = text.split(stop)[0]
        if final:
            return text.rstrip()
        while text.endswith("\ufffd"):
            text = text[:-1]
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    text = text[:-n]
                    break
        return text.rstrip()  # trailing whitespace is held back: the final answer is stripped

    def push(self, token_id: int) -> str:
        """Add one token; return the newly visible text (possibly empty)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever was held back once generation has ended."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        visible = self._visible(final)
        if not visible.startswith(self.emitted):
            return ""
        delta = visible[len(self.emitted) :]
        self.emitted = visible
        return delta
