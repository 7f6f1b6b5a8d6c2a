"""The tensor side of the engine: image tokens, prefill with prefix reuse, batched decode steps.

The running batch is one left-padded KV cache written in place (:class:`~model.engine.kv_cache.BatchKV`:
per layer ``[rows, heads, T, head_dim]`` views of larger buffers, with their ``[rows, T]`` attention
mask) and each row's next position.  The sequences admitted in one step are prefilled together in one
padded forward (each row after its own reused prefix; a lone sequence without padding is
exactly the computation a lone request does), and their KV is then written into free rows of the
batch; a finished row is overwritten by the last one, and the all-padding columns on the left are
skipped.  A decode step without padded rows runs without an attention mask.  Every row keeps its own
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
from transformers.cache_utils import DynamicCache, DynamicLayer

from model.engine.caches import ImageTokenCache, Item, PrefixEntry, PrefixStore, image_key
from model.engine.contract import RequestRejected
from model.engine.kv_cache import KV, BatchKV
from model.engine.types import SeqState
from model.generate import answer_detokenizer
from model.image_processing import ImageDecodeError, load_image
from model.minigpt4 import MiniGPT4
from model.sampling import RowSampler, sample_rows, truncate_left

__all__ = ["Runner"]

log = logging.getLogger(__name__)


def _attention_layer(layer: object) -> DynamicLayer:
    """A layer of the engine's ``DynamicCache`` (transformers types a cache's layers as any layer kind)."""
    if not isinstance(layer, DynamicLayer):
        raise TypeError(f"expected a DynamicLayer in the batch cache, got {type(layer).__name__}")
    return layer


def kv_of(cache: DynamicCache) -> KV:
    """Every layer's ``(K, V)`` of a filled cache (transformers types them optional: empty before the first update)."""
    kv = []
    for layer in cache.layers:
        attention = _attention_layer(layer)
        keys, values = attention.keys, attention.values
        if keys is None or values is None:
            raise ValueError("the batch cache has a layer without keys/values")
        kv.append((keys, values))
    return kv


def set_kv(cache: DynamicCache, kv: KV) -> None:
    """Replace every layer's ``(K, V)`` of a filled cache (slicing, padding or reordering its rows)."""
    for layer, (keys, values) in zip(cache.layers, kv, strict=True):
        attention = _attention_layer(layer)
        attention.keys, attention.values = keys, values


def _prepared(seqs: list[SeqState]) -> tuple[list[torch.Tensor], list[RowSampler]]:
    """The contexts and samplers :meth:`Runner.prepare` gave ``seqs``."""
    contexts, samplers = [], []
    for seq in seqs:
        if seq.context is None or seq.sampler is None:
            raise ValueError(f"request {seq.seq_id} was not prepared")
        contexts.append(seq.context)
        samplers.append(seq.sampler)
    return contexts, samplers


def _stack_prefixes(entries: list[PrefixEntry | None], reused: list[int], width: int) -> KV:
    """Per layer ``(K, V)`` ``[rows, heads, width, head_dim]``: each row's first ``reused`` cached positions,
    left-padded with zeros (a row without a prefix is all padding)."""
    template = next(e for e in entries if e is not None).kv
    layers = []
    for layer, (k0, v0) in enumerate(template):
        keys, values = [], []
        for entry, r in zip(entries, reused, strict=True):
            if entry is None or r == 0:
                keys.append(k0.new_zeros(1, k0.shape[1], width, k0.shape[3]))
                values.append(v0.new_zeros(1, v0.shape[1], width, v0.shape[3]))
            else:
                k, v = entry.kv[layer]
                keys.append(_pad_left(k[:, :, :r], width, 2))
                values.append(_pad_left(v[:, :, :r], width, 2))
        layers.append((torch.cat(keys), torch.cat(values)))
    return layers


def _compact(cache: DynamicCache, mask: torch.Tensor, width: int) -> None:
    """Move each row's valid KV columns (``mask == 1``, possibly with holes) to the right of a ``width`` layout.

    The columns left over on the left repeat the row's first valid column: masked, but finite.
    """
    rows = mask.shape[0]
    order = torch.arange(mask.shape[1], device=mask.device).expand(rows, -1)
    valid = torch.where(mask.bool(), order, order.new_full((), -1)).sort(dim=1).values  # valid ones last, in order
    index = valid[:, -width:]
    first = torch.where(index >= 0, index, index.new_full((), 1 << 30)).min(dim=1, keepdim=True).values
    index = torch.where(index >= 0, index, first)
    kv = kv_of(cache)
    heads, head_dim = kv[0][0].shape[1], kv[0][0].shape[3]
    gather = index[:, None, :, None].expand(rows, heads, width, head_dim)
    set_kv(cache, [(keys.gather(2, gather), values.gather(2, gather)) for keys, values in kv])


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
        self._staged: list[tuple[SeqState, PrefixEntry | None]] = []  # prefill() → run_prefills()
        # prefilled this step, joined at the next merge: (rows, their left-padded KV, each row's length)
        self._pending: list[tuple[list[SeqState], DynamicCache, list[int]]] = []
        self.batch = BatchKV()  # the running rows' KV, written in place; a row's length is its next position
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

    def prefill(self, seq: SeqState) -> None:
        """Stage a prepared sequence for this step's prefill, taking its conversation's cached KV prefix.

        The forward passes run in :meth:`run_prefills`, all staged sequences in one padded batch.
        """
        assert seq.context is not None and seq.sampler is not None
        key = seq.request.conversation_id if self.prefix_reuse else None
        reused, entry = self.prefixes.take(key, seq.items)
        seq.reused_prefix_tokens = reused
        self._staged.append((seq, entry))

    def run_prefills(self) -> list[tuple[SeqState, int | Exception]]:
        """Prefill every staged sequence, sample its first token, and queue it to join the batch.

        All of them go through one left-padded forward (:meth:`_prefill_batch`); if that fails, each is
        retried alone, so a request that cannot be prefilled fails by itself.  Returns each sequence with
        its first token or the exception that ended it.
        """
        staged, self._staged = self._staged, []
        if len(staged) > 1:
            try:
                return list(zip([seq for seq, _ in staged], self._prefill_batch(staged), strict=True))
            except Exception:
                log.warning("batched prefill of %d sequences failed; prefilling them one by one", len(staged))
        results: list[tuple[SeqState, int | Exception]] = []
        for seq, entry in staged:
            try:
                results.append((seq, self._prefill_batch([(seq, entry)])[0]))
            except Exception as exc:  # this request only
                results.append((seq, exc))
        return results

    @torch.inference_mode()
    def _prefill_batch(self, staged: list[tuple[SeqState, PrefixEntry | None]]) -> list[int]:
        """One forward for all ``staged`` sequences: what each row does not reuse, after its reused KV.

        Row ``i`` reuses ``r_i`` cached positions and computes ``s_i`` new ones.  The cache holds the
        reused KV left-padded to ``R = max r``, the new block the embeddings left-padded to
        ``S = max s``; the attention mask marks both paddings and the position ids count each row's own
        positions, so every row sees exactly its own context (a lone row has no padding at all).  The
        rows' KV is then compacted to the usual left-padded layout and queued to join the batch.
        """
        seqs = [seq for seq, _ in staged]
        reused = [seq.reused_prefix_tokens for seq in seqs]
        contexts, samplers = _prepared(seqs)
        new = [c.shape[0] - r for c, r in zip(contexts, reused, strict=True)]
        rows, width_r, width_s = len(seqs), max(reused), max(new)
        cache = DynamicCache()
        if width_r:
            cache = DynamicCache(ddp_cache_data=_stack_prefixes([e for _, e in staged], reused, width_r))
        embeds = contexts[0].new_zeros(rows, width_s, contexts[0].shape[-1])
        mask = torch.zeros(rows, width_r + width_s, dtype=torch.long, device=self.device)
        for i, (ctx, r, s) in enumerate(zip(contexts, reused, new, strict=True)):
            embeds[i, width_s - s :] = ctx[r:]
            mask[i, width_r - r : width_r] = 1
            mask[i, width_r + width_s - s :] = 1
        start = torch.tensor([r - (width_s - s) for r, s in zip(reused, new, strict=True)], device=self.device)
        positions = (torch.arange(width_s, device=self.device).unsqueeze(0) + start.unsqueeze(1)).clamp(min=0)
        padded = bool((mask == 0).any())
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask if padded else None,
            position_ids=positions,
            cache=cache,
            logits_to_keep=1,
        )
        tokens = sample_rows(samplers, out.logits[:, -1, :])
        lengths = [r + s for r, s in zip(reused, new, strict=True)]
        if padded:
            _compact(cache, mask, max(lengths))
        self._pending.append((seqs, cache, lengths))
        return tokens

    @property
    def rows(self) -> list[SeqState]:
        """Every running sequence, in batch order (pending joins last)."""
        return self._rows + [seq for seqs, _, _ in self._pending for seq in seqs]

    @torch.inference_mode()
    def _merge_pending(self) -> None:
        """Write all sequences prefilled this step into free rows of the batch cache (:class:`BatchKV`)."""
        if not self._pending:
            return
        for seqs, cache, lengths in self._pending:
            self.batch.add(kv_of(cache), lengths)
            self._rows.extend(seqs)
        self._pending = []

    @torch.inference_mode()
    def decode(self) -> list[int]:
        """One decode step for every row: feed each row's last token, sample the next one."""
        self._merge_pending()
        positions = torch.tensor(self.batch.lengths, device=self.device)  # left-padded: a row's next position
        last = torch.tensor([seq.generated[-1] for seq in self._rows], device=self.device).unsqueeze(1)  # [B, 1]
        embeds = self.model.llm.get_input_embeddings()(last)  # [B, 1, H]
        padded = self.batch.padded
        mask = self.batch.next_step_mask()
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask if padded else None,  # no padding: the plain causal path
            position_ids=positions.unsqueeze(1),
            cache=self.batch.cache,
        )
        self.batch.advance(1)
        return sample_rows(_prepared(self._rows)[1], out.logits[:, -1, :])  # one pass over [B, V]

    @torch.inference_mode()
    def remove(self, finished: list[SeqState]) -> dict[str, int]:
        """Drop rows; keep each finished conversation's KV as its prefix. Returns ``{key: tokens}`` kept."""
        if not finished:
            return {}
        self._merge_pending()
        gone = {s.seq_id for s in finished}
        kept: dict[str, int] = {}
        for index, seq in enumerate(self._rows):
            key = seq.request.conversation_id
            if seq.seq_id not in gone or not key or not self.prefix_reuse or seq.finish_reason == "aborted":
                continue
            valid = self.batch.lengths[index]
            items = seq.items + seq.generated[:-1]  # the last sampled token was never fed
            if len(items) != valid:
                log.error("prefix bookkeeping mismatch for %s (%d items, %d KV)", seq.seq_id, len(items), valid)
                continue
            self.prefixes.put(key, PrefixEntry(items, self.batch.row_kv(index)))
            kept[key] = valid
        order = self.batch.remove([i for i, s in enumerate(self._rows) if s.seq_id in gone])
        self._rows = [self._rows[i] for i in order]
        return kept

    def reset(self) -> None:
        """Forget the running batch (after a failed step); the reuse caches stay."""
        self._rows, self._pending, self._staged = [], [], []
        self.batch = BatchKV()

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
