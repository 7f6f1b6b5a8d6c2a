"""Generation on one model outside the engine: the static-batch oracle, beam search and a chat session.

As in transformers (``GenerationMixin``), generating is not the model class's job: :class:`MiniGPT4`
encodes pictures, builds prompts and context embeddings and runs ``forward``; the loops live here.

* :func:`generate` / :func:`generate_ids` / :func:`stream_ids` — the **static-batch oracle**, the
  reference-semantics loop (``MiniGPTBase.generate``: left padding + mask) that the parity tests
  compare with the reference's numbers and that the engine is checked against.  Batched rows are
  left-padded with zero embeddings and masked, with position ids counted from each row's first real
  token, so a row's greedy ids equal its unbatched ids.  Every token is chosen by
  :class:`~model.sampling.RowSampler`, the sampler the engine uses too.
* :func:`beam_search` — ``num_beams > 1``, one request at a time through transformers' ``generate``
  (the engine runs its beam requests through this same function).
* :func:`default_options` — the reference chat defaults plus the variant's stop strings.
* :func:`stream_answer` / :func:`decode_answer` / :func:`answer_detokenizer` — an answer's text
  deltas and its cleaned text, as the engine streams and finishes them too.
* :class:`ChatSession` — the reference ``Chat`` without its single-image limit (CLI ``ask`` and
  ``weights check``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers.cache_utils import DynamicCache

from model.conversation import clean_answer
from model.engine.contract import ChatTurn
from model.image_processing import load_image
from model.minigpt4 import MiniGPT4
from model.sampling import (
    GenerationOptions,
    IncrementalDetokenizer,
    RowFinish,
    RowSampler,
    sample_rows,
    truncate_left,
)

__all__ = [
    "ChatSession",
    "ChatTurnResult",
    "GenerationResult",
    "TokenStep",
    "answer_detokenizer",
    "beam_search",
    "decode_answer",
    "decode_batch",
    "default_options",
    "generate",
    "generate_ids",
    "stream_answer",
    "stream_ids",
]

Options = GenerationOptions | Sequence[GenerationOptions]


@dataclass(frozen=True)
class TokenStep:
    """One generated token of one row; ``finish_reason`` is set on the row's last token."""

    row: int
    token_id: int
    finish_reason: RowFinish | None = None


@dataclass
class GenerationResult:
    """The generated ids of one row (stop ids and EOS included, as transformers returns them)."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: RowFinish = "length"
    prompt_tokens: int = 0
    truncated_tokens: int = 0


# ----------------------------------------------------------------------------- options and text


def default_options(model: MiniGPT4, **overrides: Any) -> GenerationOptions:
    """The reference chat defaults plus ``model``'s stop strings (Vicuna: ``###``); ``None`` means not given."""
    if overrides.get("stop_strings") is None:
        overrides["stop_strings"] = model.spec.stop_strings
    return GenerationOptions.create(**overrides)


def decode_answer(model: MiniGPT4, ids: Sequence[int]) -> str:
    """Decode and clean an answer the way the reference's ``Chat.answer`` does."""
    return clean_answer(model.decode_text(ids))


def answer_detokenizer(model: MiniGPT4, options: GenerationOptions) -> IncrementalDetokenizer:
    """The streaming detokenizer for one answer: holds back ``###`` and the options' stop strings."""
    return IncrementalDetokenizer(model.decode_text, ("###", *options.stop_strings))


# ----------------------------------------------------------------------------- the static-batch oracle


@torch.inference_mode()
def decode_batch(
    model: MiniGPT4,
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
    embed = model.llm.get_input_embeddings()
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
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
    next_pos = positions[:, -1:] + 1  # [B, 1]
    running = [True] * batch
    last = [0] * batch
    while True:
        logits = out.logits[:, -1, :]  # [B, V]
        steps: list[TokenStep] = []
        live = [row for row in range(batch) if running[row]]
        chosen = sample_rows([samplers[row] for row in live], logits if len(live) == batch else logits[live])
        for row, token in zip(live, chosen, strict=True):
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
        out = model(inputs_embeds=embed(tokens).to(dtype), attention_mask=mask, position_ids=next_pos, cache=cache)
        next_pos = next_pos + 1


def stream_ids(model: MiniGPT4, contexts: Sequence[torch.Tensor], options: Options) -> Iterator[list[TokenStep]]:
    """Stream token steps for a batch of contexts (each row may have its own options; no beams)."""
    contexts = [_as_2d(c) for c in contexts]
    per_row = _per_row(options, len(contexts))
    if not contexts:
        return iter(())
    trimmed = [truncate_left(c, o.max_new_tokens, o.max_length)[0] for c, o in zip(contexts, per_row, strict=True)]
    samplers = [RowSampler(o, model.bos_id, [model.eos_id], model.device) for o in per_row]
    return decode_batch(model, trimmed, samplers, decode_tail=model.decode_text)


def generate(model: MiniGPT4, contexts: Sequence[torch.Tensor], options: Options) -> list[GenerationResult]:
    """Generate for a batch of ``Tensor[L, H]`` contexts; rows with beams > 1 run one at a time."""
    contexts = [_as_2d(c) for c in contexts]
    per_row = _per_row(options, len(contexts))
    results = [GenerationResult() for _ in contexts]
    sampled_rows = []
    for i, (ctx, opts) in enumerate(zip(contexts, per_row, strict=True)):
        trimmed, cut = truncate_left(ctx, opts.max_new_tokens, opts.max_length)
        if opts.num_beams > 1:
            results[i] = beam_search(model, trimmed, opts)
        else:
            sampled_rows.append(i)
        results[i].prompt_tokens, results[i].truncated_tokens = trimmed.shape[0], cut
    if sampled_rows:
        stream = stream_ids(model, [contexts[i] for i in sampled_rows], [per_row[i] for i in sampled_rows])
        for steps in stream:
            for step in steps:
                result = results[sampled_rows[step.row]]
                result.token_ids.append(step.token_id)
                if step.finish_reason:
                    result.finish_reason = step.finish_reason
    return results


def generate_ids(
    model: MiniGPT4,
    contexts: Sequence[torch.Tensor],
    max_new_tokens: int = 300,
    do_sample: bool = True,
    num_beams: int = 1,
    temperature: float = 1.0,
    top_p: float = 0.9,
    repetition_penalty: float = 1.05,
    **options: Any,
) -> list[list[int]]:
    """The acceptance contract: generated ids per context (EOS kept, BOS placeholder not).

    No stop strings unless given (the reference's ``generate`` has none); ``options`` are further
    :class:`~model.sampling.GenerationOptions` fields.
    """
    opts = GenerationOptions.create(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=num_beams,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        **options,
    )
    return [r.token_ids for r in generate(model, contexts, opts)]


def stream_answer(
    model: MiniGPT4, context: torch.Tensor, options: GenerationOptions, result: GenerationResult | None = None
) -> Iterator[str]:
    """Text deltas of one answer as tokens arrive; they join to :func:`decode_answer` of the ids.

    Beam search (``num_beams > 1``) cannot stream: the best beam is only known at the end, so its
    text comes as one delta once the search is done.  Pass ``result`` to receive the generated
    ids and finish reason once the stream ends.
    """
    result = result if result is not None else GenerationResult()
    if options.num_beams > 1:
        (done,) = generate(model, [context], options)
        result.token_ids, result.finish_reason = done.token_ids, done.finish_reason
        result.prompt_tokens, result.truncated_tokens = done.prompt_tokens, done.truncated_tokens
        yield decode_answer(model, done.token_ids)
        return
    detok = answer_detokenizer(model, options)
    for steps in stream_ids(model, [context], options):
        for step in steps:
            result.token_ids.append(step.token_id)
            result.finish_reason = step.finish_reason or result.finish_reason
            if delta := detok.push(step.token_id):
                yield delta
    if tail := detok.flush():
        yield tail


# ----------------------------------------------------------------------------- beam search


@torch.inference_mode()
def beam_search(model: MiniGPT4, context: torch.Tensor, options: GenerationOptions) -> GenerationResult:
    """``num_beams > 1`` for one ``Tensor[L, H]`` context through transformers' ``generate`` (no streaming).

    The context is used as given (truncate it first); the ids end at the first EOS or stop sequence.
    """
    eos_ids = [model.eos_id]
    generator_kwargs: dict[str, Any] = dict(
        inputs_embeds=context.unsqueeze(0),
        attention_mask=torch.ones(1, context.shape[0], dtype=torch.long, device=context.device),
        max_new_tokens=options.max_new_tokens,
        min_new_tokens=max(0, options.min_length - 1),
        num_beams=options.num_beams,
        do_sample=options.do_sample,
        repetition_penalty=options.repetition_penalty,
        length_penalty=options.length_penalty,
        eos_token_id=eos_ids,
        pad_token_id=eos_ids[0],
        bos_token_id=model.bos_id,
    )
    if options.do_sample:
        generator_kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
        if options.seed is not None:
            torch.manual_seed(options.seed)
    with warnings.catch_warnings():
        # Penalising generated tokens only is exactly the reference's behaviour with inputs_embeds.
        warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
        ids = model.llm.generate(**generator_kwargs)[0].tolist()
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


# ----------------------------------------------------------------------------- a chat session


@dataclass
class ChatTurnResult:
    """What the last :meth:`ChatSession.ask` produced."""

    prompt: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""


class ChatSession:
    """Conversation state for one user: turns, image tokens, and answers streamed as text.

    Each uploaded image is encoded once (projected visual tokens are kept, as ``Chat.encode_img``
    does); every turn renders the full prompt and splices the stored image tokens in again.
    """

    def __init__(self, model: MiniGPT4, options: GenerationOptions | None = None) -> None:
        self.model = model
        self.options = options or default_options(model)
        self.turns: list[ChatTurn] = []
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
            self.turns.append(ChatTurn(role="user", text="", image=True))
        self.turns.append(ChatTurn(role="user", text=text, image=self._pending_images > 0))
        self._pending_images = 0
        prompt = self.model.build_prompt(self.turns)
        context = self.model.context_embeddings(prompt, self.images)
        result = GenerationResult()
        yield from stream_answer(self.model, context, opts, result)
        answer = decode_answer(self.model, result.token_ids)
        self.turns.append(ChatTurn(role="assistant", text=answer))
        self.last = ChatTurnResult(prompt, answer, result.token_ids, result.finish_reason)


# ----------------------------------------------------------------------------- helpers


def _per_row(options: Options, rows: int) -> list[GenerationOptions]:
    per_row = [options] * rows if isinstance(options, GenerationOptions) else list(options)
    if len(per_row) != rows:
        raise ValueError(f"{rows} contexts but {len(per_row)} option sets")
    return per_row


def _as_2d(context: torch.Tensor) -> torch.Tensor:
    """Accept ``Tensor[1, L, H]`` where ``Tensor[L, H]`` is meant (what ``get_context_emb`` returns)."""
    if context.dim() == 3 and context.shape[0] == 1:
        return context[0]
    if context.dim() != 2:
        raise ValueError(f"a context must be Tensor[L, H], got shape {list(context.shape)}")
    return context
