"""One training batch exactly as the reference's ``MiniGPTBase.forward`` builds it.

Per row (reference ``prompt_wrap`` → ``concat_emb_input_output`` → BOS)::

    [BOS][prompt before <ImageHere>][visual tokens][prompt after][answer + end_sym][answer pad][prompt pad]

* the prompt (one per batch, or none in stage 1) is split at ``<ImageHere>`` and each segment tokenised on
  its own **without** special tokens; rows are right-padded with ``embed(pad)`` to the longest prompt
  (at most ``max_context_len`` = 3800 positions);
* the answer is ``text + end_sym`` tokenised without special tokens, truncated to ``max_txt_len`` and
  right-padded with the pad token ``$$``; its targets are its ids with every pad id → ``-100`` (so an answer
  containing ``$$`` loses those targets, as in the reference);
* the answer goes right after the row's real prompt, the prompt's padding after it; BOS is put in front last;
* labels are ``-100`` everywhere except the answer, and the loss is the mean cross-entropy over all answer
  tokens of the batch (``LlamaForCausalLM(labels=…)``: logits at ``t`` predict the label at ``t + 1``).

:class:`TextBatch` keeps the id view (``-1`` marks visual positions, the pad id is embedded like any id), so
the embedding is one lookup plus a scatter of the visual tokens (:func:`assemble_embeddings`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.conversation import IMAGE_PLACEHOLDER

__all__ = [
    "IGNORE_INDEX",
    "MAX_CONTEXT_LEN",
    "PAD_TOKEN",
    "VISUAL_ID",
    "BatchBuilder",
    "TextBatch",
    "answer_loss",
    "assemble_embeddings",
    "pad_token_id",
]

log = logging.getLogger("minigpt4_bot.train")

IGNORE_INDEX = -100
VISUAL_ID = -1
PAD_TOKEN = "$$"  # base_model.init_llm: llama_tokenizer.pad_token = "$$"
MAX_CONTEXT_LEN = 3800  # MiniGPTBase(max_context_len=3800)


@dataclass
class TextBatch:
    """The id view of what the LLM gets (``[B, L]`` each) and where the visual tokens go."""

    input_ids: torch.Tensor  # VISUAL_ID at visual positions, pad id at padding
    attention_mask: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX except the answer tokens
    visual_rows: torch.Tensor  # [K] row of each visual position
    visual_cols: torch.Tensor  # [K] its column
    visual_index: torch.Tensor  # [K] which of the image's N tokens goes there
    prompt: str | None

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> TextBatch:
        moved: dict[str, Any] = {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()
        }
        return TextBatch(**moved)


class BatchBuilder:
    """Tokenises prompts and answers and lays out one batch (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        num_visual_tokens: int,
        end_sym: str,
        max_txt_len: int,
        max_context_len: int = MAX_CONTEXT_LEN,
    ) -> None:
        self.tokenizer = tokenizer
        self.num_visual_tokens = num_visual_tokens
        self.end_sym = end_sym
        self.max_txt_len = max_txt_len
        self.max_context_len = max_context_len
        self.pad_id = pad_token_id(tokenizer)
        self.bos_id = int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 1)

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False).input_ids]

    def prompt_ids(self, prompt: str | None) -> list[int]:
        """The prompt's id view: segments without special tokens around ``VISUAL_ID`` × N (``prompt_wrap``)."""
        n = self.num_visual_tokens
        if not prompt:
            return [VISUAL_ID] * n
        segments = prompt.split(IMAGE_PLACEHOLDER)
        seg_ids = self._ids(segments)
        ids: list[int] = []
        for i, seg in enumerate(seg_ids[:-1]):
            ids += seg
            # one image per sample: the reference slices img[i*N:(i+1)*N], empty past the first placeholder
            ids += [VISUAL_ID] * n if i == 0 else []
        return ids + seg_ids[-1]

    def answer_ids(self, answers: Sequence[str]) -> list[list[int]]:
        """``answer + end_sym`` without special tokens, truncated to ``max_txt_len``."""
        return [ids[: self.max_txt_len] for ids in self._ids([a + self.end_sym for a in answers])]

    def build(self, answers: Sequence[str], prompt: str | None = None) -> TextBatch:
        batch = len(answers)
        cond = self.prompt_ids(prompt)[: self.max_context_len]
        cond_rows = [cond] * batch
        regress = self.answer_ids(answers)
        cond_len = max(len(c) for c in cond_rows)
        regress_len = max((len(r) for r in regress), default=0)
        length = 1 + cond_len + regress_len
        ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        rows, cols, index = [], [], []
        for b in range(batch):
            c, r = cond_rows[b], regress[b]
            ids[b, 0] = self.bos_id
            mask[b, 0] = 1 if c else 0  # bos_atts = cond_atts[:, :1]
            ids[b, 1 : 1 + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[b, 1 : 1 + len(c)] = 1
            start = 1 + len(c)
            if r:
                answer = torch.tensor(r, dtype=torch.long)
                ids[b, start : start + len(r)] = answer
                mask[b, start : start + len(r)] = 1
                labels[b, start : start + len(r)] = answer.masked_fill(answer == self.pad_id, IGNORE_INDEX)
            k = 0
            for col, token in enumerate(c, start=1):
                if token == VISUAL_ID:
                    rows.append(b)
                    cols.append(col)
                    index.append(k)
                    k += 1
        return TextBatch(
            input_ids=ids,
            attention_mask=mask,
            labels=labels,
            visual_rows=torch.tensor(rows, dtype=torch.long),
            visual_cols=torch.tensor(cols, dtype=torch.long),
            visual_index=torch.tensor(index, dtype=torch.long),
            prompt=prompt,
        )


def pad_token_id(tokenizer: Any) -> int:
    """The id of the reference's pad token ``$$`` (LLaMA: 3997).

    A vocabulary without that piece gives the unknown token's id, as the reference's slow tokenizer does
    (``pad_token = "$$"`` then ``pad_token_id`` → ``<unk>``); it is then the pad and loses its targets.
    """
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    if pad is None:
        pad = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    if pad == tokenizer.unk_token_id:
        log.warning(
            "the vocabulary has no %r piece: padding with <unk> (id %s), as the reference would", PAD_TOKEN, pad
        )
    return int(pad)


def assemble_embeddings(embed: nn.Module, batch: TextBatch, visual_tokens: torch.Tensor) -> torch.Tensor:
    """Embed the id view and put ``visual_tokens [B, N, H]`` at the visual positions → ``[B, L, H]``."""
    table_ids = batch.input_ids.clamp_min(0)
    embeds = embed(table_ids)
    if batch.visual_rows.numel():
        values = visual_tokens[batch.visual_rows, batch.visual_index].to(embeds.dtype)
        embeds = embeds.index_put((batch.visual_rows, batch.visual_cols), values)
    return embeds


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, in float32 (``LlamaForCausalLM`` 4.30)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
