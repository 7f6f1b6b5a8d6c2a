"""The running batch's KV cache, written in place: rows join, grow by one column per step and leave without re-stacking.

transformers' ``DynamicCache`` concatenates every layer's K and V on each step, so a decode step copied
the whole cache (and allocated it anew); rows joining or leaving re-stacked it again.  :class:`BatchKV`
keeps one buffer per layer, ``[row capacity, heads, column capacity, head_dim]``, zero-filled (masked
columns must stay finite), and exposes the live region ``[:rows, :, start:end]`` as views:

* a decode step writes each layer's new K/V at column ``end`` (:class:`InPlaceLayer.update`), then
  :meth:`BatchKV.advance` moves ``end`` — no copy of the cache;
* rows are left-padded: every row's valid columns end at ``end``; row ``i`` holds ``lengths[i]``;
* joining rows (:meth:`BatchKV.add`) are written right-aligned at ``end`` into free row slots (their mask
  follows from their lengths);
* a leaving row (:meth:`BatchKV.remove`) is overwritten by the batch's last row (one row copied), and
  ``start`` moves right past the columns no row uses any more;
* only when the columns or rows run out is everything copied once into larger buffers (:meth:`_repack`),
  with :data:`COLUMN_HEADROOM` spare columns; when fewer than a quarter of the row slots are in use the
  buffers shrink, and an empty batch frees them.

The views are what attention reads, so the numbers are those of a contiguous cache (the tests compare
greedy ids and logits with a lone request).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["COLUMN_HEADROOM", "KV", "BatchKV", "InPlaceLayer"]

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V), each [rows, heads, T, head_dim]

COLUMN_HEADROOM = 128  # spare columns allocated at a repack: decode steps before the next one
MIN_ROW_CAPACITY = 8  # fewer rows than a quarter of the capacity shrink it, not below this


class InPlaceLayer(DynamicLayer):
    """One layer of :class:`BatchKV` as a transformers cache layer: ``update`` writes at ``end``, returns views."""

    def __init__(self, batch: BatchKV, index: int) -> None:
        super().__init__()
        self.batch, self.index = batch, index
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's ``[rows, heads, n, head_dim]`` at columns ``end:end+n``; return the live K/V with them."""
        b = self.batch
        n = key_states.shape[-2]
        keys, values = b.buffers[self.index]
        keys[: b.rows, :, b.end : b.end + n] = key_states
        values[: b.rows, :, b.end : b.end + n] = value_states
        return keys[: b.rows, :, b.start : b.end + n], values[: b.rows, :, b.start : b.end + n]

    def get_seq_length(self) -> int:
        """Columns before this step's (what transformers counts as the past when it builds the mask)."""
        return self.batch.width


class BatchKV:
    """The batch's KV buffers and geometry (see the module docstring).  Used by the engine's worker thread only."""

    def __init__(self) -> None:
        self.repacks = 0  # how often everything was copied into new buffers (for tests and benchmarks)
        self._clear()

    def _clear(self) -> None:
        self.buffers: KV = []  # per layer: [row capacity, heads, column capacity, head_dim]
        self.mask_buffer = torch.zeros(0, 0, dtype=torch.long)  # [row capacity, column capacity]
        self.rows = 0
        self.start = 0  # first column any row uses
        self.end = 0  # next column to write; every row's valid columns end here
        self.lengths: list[int] = []  # valid columns per row
        self.cache = DynamicCache()

    # ------------------------------------------------------------------ views

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def mask(self) -> torch.Tensor:
        """``[rows, width]`` attention mask of the live region (1 = a valid column)."""
        return self.mask_buffer[: self.rows, self.start : self.end]

    @property
    def padded(self) -> bool:
        """Whether some row is shorter than the live region (else attention needs no mask)."""
        return bool(self.lengths) and min(self.lengths) < self.width

    def layer_kv(self) -> KV:
        """Each layer's live ``(K, V)`` views ``[rows, heads, width, head_dim]``."""
        return [(k[: self.rows, :, self.start : self.end], v[: self.rows, :, self.start : self.end])
                for k, v in self.buffers]  # fmt: skip

    def row_kv(self, row: int) -> KV:
        """A copy of row ``row``'s valid K/V, ``[1, heads, length, head_dim]`` per layer (kept as a prefix)."""
        first = self.end - self.lengths[row]
        return [(k[row : row + 1, :, first : self.end].clone(), v[row : row + 1, :, first : self.end].clone())
                for k, v in self.buffers]  # fmt: skip

    # ------------------------------------------------------------------ a decode step

    def next_step_mask(self) -> torch.Tensor:
        """Make room for one more column, mark it valid for every row, return the ``[rows, width + 1]`` mask."""
        self._ensure(self.rows, max(self.lengths, default=0), 1)
        self.mask_buffer[: self.rows, self.end] = 1
        return self.mask_buffer[: self.rows, self.start : self.end + 1]

    def advance(self, n: int = 1) -> None:
        """After a forward wrote ``n`` columns at ``end`` in every layer."""
        self.end += n
        self.lengths = [length + n for length in self.lengths]

    # ------------------------------------------------------------------ rows joining and leaving

    def add(self, kv: KV, lengths: list[int]) -> None:
        """Append rows: per layer ``[r, heads, w, head_dim]``, row ``i``'s ``lengths[i]`` valid columns last."""
        new_rows, w = len(lengths), kv[0][0].shape[2]
        if not self.buffers:
            self._allocate_like(kv, new_rows, w + COLUMN_HEADROOM)
            self.mask_buffer = torch.zeros(new_rows, w + COLUMN_HEADROOM, dtype=torch.long, device=kv[0][0].device)
            self.start = self.end = w
            self._wire()
        self._ensure(self.rows + new_rows, w, 0)
        rows = slice(self.rows, self.rows + new_rows)
        for (keys, values), (k, v) in zip(self.buffers, kv, strict=True):
            keys[rows, :, self.end - w : self.end] = k
            values[rows, :, self.end - w : self.end] = v
        columns = torch.arange(self.end, device=self.mask_buffer.device)
        first = self.end - torch.tensor(lengths, device=self.mask_buffer.device)  # each row's first valid column
        self.mask_buffer[rows, : self.end] = (columns[None, :] >= first[:, None]).long()
        self.rows += new_rows
        self.lengths.extend(lengths)
        self.start = self.end - max(self.lengths)

    def remove(self, rows: list[int]) -> list[int]:
        """Drop ``rows``; each is overwritten by the last live row.  Returns the old index of each row now live."""
        order = list(range(self.rows))
        for row in sorted(set(rows), reverse=True):
            last = len(order) - 1
            if row != last:
                for keys, values in self.buffers:
                    keys[row, :, self.start : self.end] = keys[last, :, self.start : self.end]
                    values[row, :, self.start : self.end] = values[last, :, self.start : self.end]
                self.mask_buffer[row, : self.end] = self.mask_buffer[last, : self.end]
                self.lengths[row] = self.lengths[last]
                order[row] = order[last]
            order.pop()
            self.lengths.pop()
        self.rows = len(order)
        self.start = self.end - max(self.lengths, default=0)
        if not self.rows:  # an idle engine holds no KV: the next rows allocate afresh
            self._clear()
        elif self.rows * 4 <= self.mask_buffer.shape[0] and self.mask_buffer.shape[0] > MIN_ROW_CAPACITY:
            self._repack(max(2 * self.rows, MIN_ROW_CAPACITY), self.width)  # after a burst: give the rows back
        return order

    # ------------------------------------------------------------------ room

    def _ensure(self, rows: int, longest: int, extra_columns: int) -> None:
        """Repack unless ``rows`` rows, a row of ``longest`` columns ending at ``end`` and ``extra_columns`` fit."""
        row_capacity, column_capacity = self.mask_buffer.shape
        if rows <= row_capacity and longest <= self.end and self.end + extra_columns <= column_capacity:
            return
        self._repack(row_capacity if rows <= row_capacity else max(rows, 2 * row_capacity), longest)

    def _allocate_like(self, template: KV, rows: int, columns: int) -> None:
        self.buffers = [(k.new_zeros(rows, k.shape[1], columns, k.shape[3]),
                         v.new_zeros(rows, v.shape[1], columns, v.shape[3])) for k, v in template]  # fmt: skip

    def _repack(self, rows: int, longest: int) -> None:
        """Copy the live region into new buffers: ``longest`` columns up to ``end``, then the headroom."""
        old, old_mask = self.layer_kv(), self.mask
        width = max(longest, self.width)
        self._allocate_like(old, rows, width + COLUMN_HEADROOM)
        for (keys, values), (k, v) in zip(self.buffers, old, strict=True):
            keys[: self.rows, :, width - self.width : width] = k
            values[: self.rows, :, width - self.width : width] = v
        mask = old_mask.new_zeros(rows, width + COLUMN_HEADROOM)
        mask[: self.rows, width - self.width : width] = old_mask
        self.mask_buffer = mask
        self.start, self.end = width - self.width, width
        self.repacks += 1
        self._wire()

    def _wire(self) -> None:
        """Point a fresh transformers cache at these buffers (one :class:`InPlaceLayer` per layer)."""
        self.cache = DynamicCache()
        self.cache.layers = [InPlaceLayer(self, i) for i in range(len(self.buffers))]
        self.cache.layer_class_to_replicate = None
