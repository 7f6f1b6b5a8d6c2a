"""The batch KV cache written in place (model.engine.kv_cache): the same K/V as plain concatenation, no copy per step.

A random sequence of rows joining (left-padded, of different lengths), decode steps and rows leaving
(from the middle too) is replayed on :class:`BatchKV` and on per-row lists of columns; after every
operation each live row's valid columns, its mask, the padding flag and the live width must agree,
and the decode steps between two repacks must write into the same buffers.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from engine_helpers import ask, bounded, collect, endless

from model.engine import Engine
from model.engine.kv_cache import COLUMN_HEADROOM, MIN_ROW_CAPACITY, BatchKV

LAYERS, HEADS, DIM = 2, 2, 4


def _kv(rows: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(rows, HEADS, width, DIM), torch.randn(rows, HEADS, width, DIM)) for _ in range(LAYERS)]


def _check(batch: BatchKV, rows: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """``rows[i][layer]`` = row i's expected valid (K, V) ``[heads, length, dim]``."""
    assert batch.rows == len(rows)
    lengths = [expected[0][0].shape[1] for expected in rows]
    assert batch.lengths == lengths
    assert batch.width == max(lengths, default=0)  # no column that every row leaves unused
    assert batch.padded == (bool(lengths) and min(lengths) < max(lengths))
    live = batch.layer_kv()
    for i, expected in enumerate(rows):
        pad = batch.width - lengths[i]
        assert batch.mask[i].tolist() == [0] * pad + [1] * lengths[i]
        for (keys, values), (k, v) in zip(live, expected, strict=True):
            assert torch.equal(keys[i, :, pad:], k) and torch.equal(values[i, :, pad:], v)
            assert torch.isfinite(keys[i]).all() and torch.isfinite(values[i]).all()  # masked columns too
        for (kept_k, kept_v), (k, v) in zip(batch.row_kv(i), expected, strict=True):
            assert torch.equal(kept_k[0], k) and torch.equal(kept_v[0], v)


@pytest.mark.parametrize("seed", range(6))
def test_joins_steps_and_leaves_keep_every_row_equal_to_plain_concatenation(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    batch = BatchKV()
    rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    steps_without_repack = 0
    for _ in range(120):
        op = rng.choices(["join", "step", "leave"], weights=[2, 10, 2] if rows else [1, 0, 0])[0]
        if op == "join":
            lengths = [rng.randint(1, 40 if rng.random() < 0.8 else 300) for _ in range(rng.randint(1, 4))]
            width = max(lengths)
            kv = _kv(len(lengths), width)
            mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
            for k, _ in kv:  # padding columns hold garbage the mask hides (the prefill's compaction repeats one)
                k.masked_fill_(mask[:, None, :, None] == 0, 7.0)
            batch.add(kv, lengths)
            rows += [[(k[r, :, width - n :], v[r, :, width - n :]) for k, v in kv] for r, n in enumerate(lengths)]
        elif op == "step":
            before, pointers = batch.repacks, [k.data_ptr() for k, _ in batch.buffers]
            mask = batch.next_step_mask()
            assert mask.shape == (len(rows), batch.width + 1) and bool(mask[:, -1].all())
            new = _kv(len(rows), 1)
            for layer, (k, v) in zip(batch.cache.layers, new, strict=True):
                assert layer.get_seq_length() == batch.width
                keys, values = layer.update(k, v)
                assert keys.shape == (len(rows), HEADS, batch.width + 1, DIM)
                assert torch.equal(keys[:, :, -1:], k) and torch.equal(values[:, :, -1:], v)
            batch.advance(1)
            rows = [[(torch.cat([ek, k[i]], 1), torch.cat([ev, v[i]], 1))
                     for (ek, ev), (k, v) in zip(row, new, strict=True)] for i, row in enumerate(rows)]  # fmt: skip
            if batch.repacks == before:  # written in place
                steps_without_repack += 1
                assert [k.data_ptr() for k, _ in batch.buffers] == pointers
        else:
            leaving = rng.sample(range(len(rows)), rng.randint(1, len(rows)))
            order = batch.remove(leaving)
            assert sorted(order) == [i for i in range(len(rows)) if i not in leaving]
            rows = [rows[i] for i in order]
        _check(batch, rows)
    assert steps_without_repack > 0


def test_a_long_answer_repacks_once_per_headroom_not_once_per_step(m) -> None:
    """A 300-token answer: the decode steps write in place; the cache is copied about once per 128 steps."""

    async def main():
        async with Engine(m) as eng:
            _, final = await collect(eng.submit(ask(m, "Describe it.", endless(m, 300))))
            return final, eng.runner

    final, runner = asyncio.run(bounded(main()))
    assert len(final.token_ids) == 300
    assert 1 <= runner.batch.repacks <= 300 // COLUMN_HEADROOM + 1


def test_rows_are_given_back_after_a_burst_and_an_empty_batch_holds_nothing() -> None:
    torch.manual_seed(0)
    batch = BatchKV()
    lengths = list(range(1, 21))
    batch.add(_kv(20, 20), lengths)
    assert batch.mask_buffer.shape[0] >= 20
    kept = batch.row_kv(19)  # the longest row, which stays
    order = batch.remove(list(range(17)))
    assert batch.rows == 3 and batch.mask_buffer.shape[0] == MIN_ROW_CAPACITY  # 3 rows: a quarter of 20 or less
    row = order.index(19)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batch.row_kv(row), kept, strict=True))
    batch.remove([0, 1, 2])
    assert batch.rows == 0 and batch.buffers == [] and batch.repacks >= 1
