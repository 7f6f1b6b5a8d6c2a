"""The tensor side of the engine: image tokens, prefill with prefix reuse, batched decode steps.

The running batch is one left-padded KV cache (a transformers ``DynamicCache`` whose layer
tensors are ``[rows, heads, T, head_dim]``) plus a ``[rows, T]`` attention mask and each
row's next position.  A new sequence is prefilled on its own — exactly the computation a
lone request does — and its KV is then padded and stacked onto the batch; finished rows are
sliced out and the all-padding columns on the left trimmed.  Every row keeps its own
:class:`~model.sampling.RowSampler` (options, history, generator); a decode step samples all rows in
one :func:`~model.sampling.sample_rows` pass, whose ids equal each row's own, so a row's greedy ids
do not depend on its neighbours.
All LLM passes go through :meth:`MiniGPT4.forward`.
"""

from __future__ import annotations

import io
import logging

import torch
from PIL import Image
from transformers.cache_utils import DynamicCache

from model.engine.caches import ImageTokenCache, Item, PrefixEntry, PrefixStore, image_key
from model.engine.contract import RequestRejected
from model.engine.types import SeqState
from model.generate import answer_detokenizer
from model.image_processing import ImageDecodeError, load_image
from model.minigpt4 import MiniGPT4
from model.sampling import RowSampler, sample_rows, truncate_left

__all__ = ["Runner"]

log = logging.getLogger(__name__)


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Runner:
    """Owns the model, the batch KV cache and the two reuse caches.  Used by one worker thread only."""

    def __init__(self, model: MiniGPT4, image_cache_size: int = 256, prefix_reuse: bool = True) -> None:
        self.model = model
        self.images = ImageTokenCache(image_cache_size)
        self.prefixes = PrefixStore()
        self.prefix_reuse = prefix_reuse
        self._rows: list[SeqState] = []  # rows in the batch cache
        self._pending: list[tuple[SeqState, DynamicCache, int]] = []  # prefilled, joined at the next merge
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, T] long
        self.positions: torch.Tensor | None = None  # [rows] next position of each row
        self.device = model.device

    # ------------------------------------------------------------------ preparing a sequence

    def image_tokens(self, keys: list[str], raw: list[bytes | Image.Image]) -> list[torch.Tensor]:
        """Visual tokens per image, encoding all cache misses in one batch.

        Raises :class:`~model.engine.contract.RequestRejected` (reason ``"image"``, 0-based ``image_index``)
        for a picture that cannot be decoded.
        """
        out: list[torch.Tensor | None] = [self.images.get(k) for k in keys]
        missing = [i for i, t in enumerate(out) if t is None]
        if missing:
            pixels = []
            for i in missing:
                data = raw[i]
                try:
                    pil = load_image(data if isinstance(data, Image.Image) else bytes(data))
                except ImageDecodeError as exc:
                    raise RequestRejected("image", str(exc), image_index=i) from exc
                pixels.append(self.model.preprocess(pil))
            encoded = self.model.encode_images(torch.stack(pixels))  # [M, N, H]
            for j, i in enumerate(missing):
                out[i] = encoded[j]
                self.images.put(keys[i], encoded[j])
        return [t for t in out if t is not None]

    def prepare(self, seq: SeqState) -> None:
        """Build the context embeddings and the item list (what each position holds), then truncate."""
        # Hashing (possibly large) image bytes happens here, on the worker, not on the event loop.
        seq.image_keys = [image_key(image_bytes(image)) for image in seq.request.images]
        tokens = self.image_tokens(seq.image_keys, list(seq.request.images))
        context = self.model.context_embeddings(seq.prompt, tokens)  # [L, H]
        items: list[Item] = []
        for i, ids in enumerate(seq.segments):
            items.extend(ids)
            if i < len(tokens):
                items.extend(("img", seq.image_keys[i], j) for j in range(tokens[i].shape[0]))
        context, cut = truncate_left(context, seq.options.max_new_tokens, seq.options.max_length)
        if cut:
            log.warning("request %s: context cut by %d tokens from the left (max_length)", seq.seq_id, cut)
        seq.context, seq.items = context, items[cut:]
        seq.sampler = RowSampler(seq.options, self.model.bos_id, [self.model.eos_id], self.device)
        seq.detok = answer_detokenizer(self.model, seq.options)

    # ------------------------------------------------------------------ prefill and decode

    @torch.inference_mode()
    def prefill(self, seq: SeqState) -> int:
        """Compute the sequence's context (reusing its conversation's cached KV prefix), sample token 1, join."""
        assert seq.context is not None and seq.sampler is not None
        key = seq.request.conversation_id if self.prefix_reuse else None
        reused, entry = self.prefixes.take(key, seq.items)
        length = seq.context.shape[0]
        if entry is not None:
            cache = DynamicCache(ddp_cache_data=[(k[:, :, :reused], v[:, :, :reused]) for k, v in entry.kv])
            positions = torch.arange(reused, length, device=self.device).unsqueeze(0)
            out = self.model(
                inputs_embeds=seq.context[reused:].unsqueeze(0), position_ids=positions, cache=cache, logits_to_keep=1
            )
        else:
            cache = DynamicCache()
            out = self.model(inputs_embeds=seq.context.unsqueeze(0), cache=cache, logits_to_keep=1)
        seq.reused_prefix_tokens = reused
        token = seq.sampler.next_token(out.logits[0, -1])
        self._join(seq, cache, length)
        return token

    def _join(self, seq: SeqState, cache: DynamicCache, length: int) -> None:
        self._pending.append((seq, cache, length))

    @property
    def rows(self) -> list[SeqState]:
        """Every running sequence, in batch order (pending joins last)."""
        return self._rows + [seq for seq, _, _ in self._pending]

    def _merge_pending(self) -> None:
        """Stack all sequences prefilled this step onto the batch in one copy of the KV cache."""
        if not self._pending:
            return
        parts = [(self.cache, self.mask, self.positions)] if self._rows else []
        for seq, cache, length in self._pending:
            parts.append((cache, torch.ones(1, length, dtype=torch.long, device=self.device),
                          torch.tensor([length], device=self.device)))  # fmt: skip
            self._rows.append(seq)
        self._pending = []
        width = max(mask.shape[1] for _, mask, _ in parts)
        merged = parts[0][0]
        for i, layer in enumerate(merged.layers):
            layer.keys = torch.cat([_pad_left(c.layers[i].keys, width, 2) for c, _, _ in parts])
            layer.values = torch.cat([_pad_left(c.layers[i].values, width, 2) for c, _, _ in parts])
        self.cache = merged
        self.mask = torch.cat([_pad_left(mask, width, 1) for _, mask, _ in parts])
        self.positions = torch.cat([pos for _, _, pos in parts])

    @torch.inference_mode()
    def decode(self) -> list[int]:
        """One decode step for every row: feed each row's last token, sample the next one."""
        self._merge_pending()
        assert self.cache is not None and self.mask is not None and self.positions is not None
        last = torch.tensor([seq.generated[-1] for seq in self._rows], device=self.device).unsqueeze(1)  # [B, 1]
        embeds = self.model.llm.get_input_embeddings()(last)  # [B, 1, H]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self._rows), 1)], dim=1)
        out = self.model(
            inputs_embeds=embeds, attention_mask=self.mask, position_ids=self.positions.unsqueeze(1), cache=self.cache
        )
        self.positions = self.positions + 1
        samplers = [seq.sampler for seq in self._rows]
        assert all(s is not None for s in samplers)
        return sample_rows(samplers, out.logits[:, -1, :])  # type: ignore[arg-type]  # one pass over [B, V]

    def remove(self, finished: list[SeqState]) -> dict[str, int]:
        """Drop rows; keep each finished conversation's KV as its prefix. Returns ``{key: tokens}`` kept."""
        if not finished:
            return {}
        self._merge_pending()
        assert self.cache is not None and self.mask is not None and self.positions is not None
        gone = {s.seq_id for s in finished}
        kept: dict[str, int] = {}
        width = self.mask.shape[1]
        for index, seq in enumerate(self._rows):
            key = seq.request.conversation_id
            if seq.seq_id not in gone or not key or not self.prefix_reuse or seq.finish_reason == "aborted":
                continue
            valid = int(self.mask[index].sum())  # left-padded: the valid columns are the last `valid`
            kv = [
                (layer.keys[index : index + 1, :, width - valid :].clone(),
                 layer.values[index : index + 1, :, width - valid :].clone())
                for layer in self.cache.layers
            ]  # fmt: skip
            items = seq.items + seq.generated[:-1]  # the last sampled token was never fed
            if len(items) != valid:
                log.error("prefix bookkeeping mismatch for %s (%d items, %d KV)", seq.seq_id, len(items), valid)
                continue
            self.prefixes.put(key, PrefixEntry(items, kv))
            kept[key] = valid
        keep = [i for i, s in enumerate(self._rows) if s.seq_id not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self.cache = self.mask = self.positions = None
            return kept
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        first = int((mask.sum(0) > 0).nonzero()[0])  # leading columns that are padding in every row
        self.mask = mask[:, first:]
        self.positions = self.positions[index]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        return kept

    def reset(self) -> None:
        """Forget the running batch (after a failed step); the reuse caches stay."""
        self._rows, self._pending = [], []
        self.cache = self.mask = self.positions = None

    def evict(self, keys: tuple[str, ...] | list[str]) -> None:
        for key in keys:
            self.prefixes.evict(key)

    @property
    def batch_size(self) -> int:
        return len(self.rows)


def image_bytes(image: bytes | Image.Image) -> bytes:
    """Stable bytes for hashing a PIL image given instead of raw bytes."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    return bytes(image)
