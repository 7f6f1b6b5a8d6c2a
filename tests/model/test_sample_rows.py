"""The vectorised sampler (``sample_rows``) chooses the ids the per-row sampler chooses (issue 27).

Random logits, rows with mixed options (greedy and sampled, repetition penalty, temperature,
top-k / top-p on and off, min-length, per-row seeds and the global generator), several steps so
the penalty sees growing histories.  Same ids, step by step, row by row.
"""

from __future__ import annotations

import random

import pytest
import torch

from model.sampling import GenerationOptions, RowSampler, sample_rows

BOS, EOS, VOCAB = 1, 2, 300


def _options(rng: random.Random, seeded: bool) -> GenerationOptions:
    return GenerationOptions.create(
        do_sample=rng.random() < 0.6,
        temperature=rng.choice([1.0, 0.7, 1.3]),
        top_k=rng.choice([0, 1, 5, 50, 1000]),
        top_p=rng.choice([1.0, 0.9, 0.5]),
        repetition_penalty=rng.choice([1.0, 1.05, 1.3]),
        min_length=rng.choice([1, 1, 3]),
        seed=rng.randrange(1000) if seeded else None,
        max_new_tokens=20,
    )


def _pair(options: list[GenerationOptions]) -> tuple[list[RowSampler], list[RowSampler]]:
    make = lambda: [RowSampler(o, BOS, [EOS], torch.device("cpu")) for o in options]  # noqa: E731
    return make(), make()


@pytest.mark.parametrize("case", range(12))
def test_sample_rows_gives_the_per_row_ids(case: int) -> None:
    rng = random.Random(case)
    rows = rng.choice([1, 3, 8, 16])
    options = [_options(rng, seeded=case % 2 == 0 or rng.random() < 0.5) for _ in range(rows)]
    per_row, batched = _pair(options)
    logits_rng = torch.Generator().manual_seed(case)
    for _ in range(6):
        logits = torch.randn(rows, VOCAB, generator=logits_rng) * 3
        logits[:, EOS] += 4  # EOS often on top, so the min-length mask matters
        torch.manual_seed(1234 + case)  # unseeded rows draw from the global generator, in row order
        expected = [s.next_token(logits[i]) for i, s in enumerate(per_row)]
        torch.manual_seed(1234 + case)
        before = logits.clone()
        assert sample_rows(batched, logits) == expected
        assert torch.equal(logits, before)  # the caller's logits stay intact
    assert [s.history for s in batched] == [s.history for s in per_row]


def test_greedy_rows_are_the_argmax_after_penalty_and_min_length() -> None:
    options = [GenerationOptions.create(do_sample=False, repetition_penalty=p, min_length=m)
               for p, m in ((1.0, 1), (1.2, 1), (1.0, 5), (2.0, 5))]  # fmt: skip
    per_row, batched = _pair(options)
    for step in range(8):
        logits = torch.randn(len(options), VOCAB, generator=torch.Generator().manual_seed(step))
        logits[:, EOS] += 3
        assert sample_rows(batched, logits) == [s.next_token(logits[i]) for i, s in enumerate(per_row)]


def test_no_rows_no_tokens() -> None:
    assert sample_rows([], torch.zeros(0, VOCAB)) == []
