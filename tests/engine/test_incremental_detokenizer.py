"""The streaming detokeniser decodes a short window per token, and its text equals the full decode.

Random ids over the parity tokenizer (SentencePiece, 256 byte-fallback pieces, ``<unk>``/BOS/EOS
that decoding drops, lone ``▁``): after every token the incremental text equals ``decode(ids)``, and the
deltas equal those of decoding the whole answer each time (what the detokeniser did before).
"""

from __future__ import annotations

import random

import pytest

from model.generate import answer_detokenizer, default_options
from model.sampling import IncrementalDetokenizer


@pytest.fixture(scope="module")
def m(parity_model):
    return parity_model


class FullDecode(IncrementalDetokenizer):
    """The previous behaviour: decode every id on each token."""

    def _extend(self) -> None:
        self.text = self._decode(self.ids)


def random_ids(rng: random.Random, size: int, n: int) -> list[int]:
    special = [0, 1, 2]
    byte_runs = [[0xC3 + 3, 0xA9 + 3], [0xE2 + 3, 0x82 + 3, 0xAC + 3], [0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3]]
    ids: list[int] = []
    while len(ids) < n:
        roll = rng.random()
        if roll < 0.1:
            ids.append(rng.choice(special))
        elif roll < 0.25:
            ids.append(rng.randrange(3, 259))  # any byte: also invalid and cut-off sequences
        elif roll < 0.35:
            ids.extend(rng.choice(byte_runs))  # a whole UTF-8 character in byte pieces
        else:
            ids.append(rng.randrange(259, size))
    return ids[:n]


@pytest.mark.parametrize("seed", range(40))
def test_incremental_text_and_deltas_equal_the_full_decode(m, seed: int) -> None:
    rng = random.Random(seed)
    ids = random_ids(rng, m.text._sp.get_piece_size(), rng.randrange(1, 120))
    stops = ("###", "Human:") if seed % 2 else ("###",)
    incremental = IncrementalDetokenizer(m.decode_text, stops)
    full = FullDecode(m.decode_text, stops)
    for n, token in enumerate(ids, start=1):
        assert incremental.push(token) == full.push(token), (ids[:n], incremental.text, m.decode_text(ids[:n]))
        assert incremental.text == m.decode_text(ids[:n])
    assert incremental.flush() == full.flush()
    assert incremental.emitted == full.emitted


def test_each_token_decodes_a_short_window(m) -> None:
    decoded: list[int] = []

    def decode(ids: list[int]) -> str:
        decoded.append(len(ids))
        return m.decode_text(ids)

    ids = m.tokenizer(" ".join(["the red circle sits beside a green square"] * 30), add_special_tokens=False).input_ids
    detok = answer_detokenizer(m, default_options(m))
    detok._decode = decode
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == m.decode_text(ids).strip() and len(ids) > 200
    assert max(decoded) <= 8  # not the whole answer on every token
