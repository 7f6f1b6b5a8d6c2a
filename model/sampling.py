"""Engine primitives: generation options, per-row sampling and streaming detokenization.

Reference: ``Chat.answer_prepare`` / ``Chat.model_generate`` (transformers 4.30
``generate(inputs_embeds=…)``).  These are the pieces every generation loop shares — the
static-batch oracle and beam search in :mod:`model.generate` and the continuous-batching
engine in :mod:`model.engine` — so one sampler decides every token, whichever loop runs it.

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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Literal

import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from model.engine.contract import RequestRejected

RowFinish = Literal["eos", "stop", "length"]  # why a row stopped generating (the engine adds aborted / deadline)

__all__ = [
    "GenerationOptions",
    "IncrementalDetokenizer",
    "InvalidGenerationOptions",
    "RowSampler",
    "sample_rows",
    "truncate_left",
]


class InvalidGenerationOptions(RequestRejected, ValueError):
    """A generation option is unknown or out of range; ``detail`` names the option and the range.

    A :class:`~model.engine.contract.RequestRejected` with reason ``"invalid"``, so a backend may let it
    through as it is (and a ``ValueError`` for plain callers).
    """

    def __init__(self, detail: str) -> None:
        super().__init__("invalid", detail)


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

    def finish_reason(self, decode_tail: Callable[[list[int]], str] | None) -> RowFinish | None:
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


def sample_rows(samplers: Sequence[RowSampler], logits: torch.Tensor) -> list[int]:
    """The next token of every row at once — the same ids as ``samplers[i].next_token(logits[i])``.

    ``logits`` is ``Tensor[B, V]``, row ``i`` belonging to ``samplers[i]`` (whose history gets the token).
    Every processor runs once over the batch with per-row parameters, so a decode step costs a fixed
    number of tensor ops whatever the batch: the repetition penalty over each row's own ``{BOS} ∪
    generated`` (padded with its BOS, a duplicate), the min-length EOS mask, then for sampled rows
    temperature → top-k → top-p in transformers' order and formulas.  A penalty or temperature of 1.0
    multiplies or divides by 1.0, which is exact, so mixed rows need no separate path.  Greedy rows
    take one ``argmax``; each sampled row draws its ``multinomial`` with its own generator (or the
    global one, in row order), which keeps seeded answers identical to the per-row sampler.
    """
    rows = len(samplers)
    if rows == 0:
        return []
    device = logits.device
    scores = logits.float()
    options = [s.options for s in samplers]
    penalties = [o.repetition_penalty for o in options]
    if any(p != 1.0 for p in penalties):
        width = max(len(s.history) for s in samplers)
        ids = torch.tensor([s.history + [s.history[0]] * (width - len(s.history)) for s in samplers], device=device)
        picked = scores.gather(1, ids)
        penalty = torch.tensor(penalties, dtype=torch.float32, device=device).unsqueeze(1)
        scores = scores.scatter(1, ids, torch.where(picked < 0, picked * penalty, picked / penalty))
    short = [i for i, s in enumerate(samplers) if len(s.history) < s.options.min_length]
    if short:
        scores = scores.clone() if scores is logits else scores
        for i in short:  # rare (min_length > 1): a handful of rows, a few steps
            scores[i, samplers[i].eos_ids] = -float("inf")
    sampled = [i for i, o in enumerate(options) if o.do_sample]
    tokens = scores.argmax(dim=-1).tolist() if len(sampled) < rows else [0] * rows
    if sampled:
        probs = _warped_probs(scores[sampled] if len(sampled) < rows else scores, [options[i] for i in sampled])
        for j, i in enumerate(sampled):
            tokens[i] = int(torch.multinomial(probs[j : j + 1], 1, generator=samplers[i].generator).item())
    for sampler, token in zip(samplers, tokens, strict=True):
        sampler.history.append(token)
    return tokens


def _warped_probs(scores: torch.Tensor, options: Sequence[GenerationOptions]) -> torch.Tensor:
    """Temperature → top-k → top-p (transformers' warpers, per-row parameters) and softmax, for sampled rows."""
    device = scores.device
    temperature = torch.tensor([o.temperature for o in options], dtype=torch.float32, device=device).unsqueeze(1)
    scores = scores / temperature
    top_k = [min(o.top_k, scores.shape[-1]) for o in options]
    if any(top_k):
        kth = torch.topk(scores, max(top_k)).values  # [R, max k], descending
        index = torch.tensor([max(k, 1) - 1 for k in top_k], device=device).unsqueeze(1)
        threshold = kth.gather(1, index)
        threshold[torch.tensor([k == 0 for k in top_k], device=device)] = -float("inf")
        scores = scores.masked_fill(scores < threshold, -float("inf"))
    nucleus = [i for i, o in enumerate(options) if o.top_p < 1.0]
    if nucleus:
        part = scores[nucleus]
        sorted_logits, sorted_indices = torch.sort(part, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        cut = torch.tensor([1 - options[i].top_p for i in nucleus], dtype=torch.float32, device=device)
        remove = cumulative <= cut.unsqueeze(1)
        remove[..., -1:] = False
        remove = remove.scatter(1, sorted_indices, remove)
        scores = scores.clone()
        scores[nucleus] = part.masked_fill(remove, -float("inf"))
    return torch.softmax(scores, dim=-1)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas safe to show while streaming.

    Holds back an incomplete UTF-8 character (byte-fallback pieces decode to U+FFFD until
    complete), any tail that could still become a stop string such as Vicuna's ``###``,
    and leading whitespace (the reference strips the final answer).

    Decoding is incremental (as vLLM's detokenizer): each token decodes a short window of ids
    from the last safe point instead of the whole answer, and the window's text minus its first
    part's is appended.  A safe point follows a complete character and starts a part that decodes
    to some text, so SentencePiece's leading-space rule and byte merging act the same inside the
    window as in the full decode: :attr:`text` always equals ``decode(ids)``.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ("###",)):
        self._decode = decode
        self._stops = tuple(stop_strings)
        self.ids: list[int] = []
        self.emitted = ""
        self.text = ""  # decode(ids)
        self._committed = ""  # decode(ids[:_read])
        self._prefix = 0  # window start: ids[_prefix:] is decoded for each new token
        self._read = 0  # ids up to here are in _committed
        self._prefix_text = ""  # decode(ids[_prefix:_read]) on its own

    def _extend(self) -> None:
        """Bring :attr:`text` up to the ids, decoding the window only; move the safe point when it is complete."""
        window = self._decode(self.ids[self._prefix :])
        if not window.startswith(self._prefix_text):  # not seen with SentencePiece; stay exact
            self._prefix, self._prefix_text, self._committed = 0, "", ""
            window = self._decode(self.ids)
        self.text = self._committed + window[len(self._prefix_text) :]
        if self.text.endswith("\ufffd"):
            return  # an incomplete character: the window keeps its start
        part = self._decode(self.ids[self._read :])
        if part:  # the next window starts here
            self._prefix, self._prefix_text = self._read, part
        else:  # the new part decodes to nothing on its own (a lone space, special ids): keep the start
            self._prefix_text = window
        self._read, self._committed = len(self.ids), self.text

    def _visible(self, final: bool) -> str:
        text = self.text.lstrip()
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
        self._extend()
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
