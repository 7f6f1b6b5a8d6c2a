"""Training data as a mix of sources: the reference's ``MultiIterLoader`` — and one ``data`` is a mix of one.

Several sources (``[[train.datasets]]``, the reference's stage-1 LAION + CC/SBU mix) are mixed by
:class:`MixedStream`: each step one source is drawn with probability ``sample_ratio / sum(sample_ratio)``
(``random.choices`` from a generator seeded ``seed + rank``) and gives its next batch.  Each source keeps its
own stream and position; the mix's position (:class:`MixedPosition`) is the sources' positions + how many
batches each has given; the generator's state is saved by its owner.

One ``data`` source goes through the same path as a mix of one: the reference wraps a single dataset in a
``MultiIterLoader`` too, whose draw (``random.choices`` over one loader: one ``random()``) is made all the same,
so the training loop has one code path and the prompts drawn after it are the reference's.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from model.training.data import BadRecords, Batch, BatchStream, DataError

__all__ = ["MixedBadRecords", "MixedPosition", "MixedStream"]


class MixedBadRecords:
    """The bad-record counters of several sources seen as one (``total``, ``counts``), and each by name."""

    def __init__(self, parts: dict[str, BadRecords]) -> None:
        self.parts = parts

    @property
    def total(self) -> int:
        return sum(part.total for part in self.parts.values())

    @property
    def counts(self) -> dict[str, int]:
        merged: dict[str, int] = {}
        for part in self.parts.values():
            for kind, count in part.counts.items():
                merged[kind] = merged.get(kind, 0) + count
        return merged

    def by_source(self) -> dict[str, int]:
        return {name: part.total for name, part in self.parts.items()}


@dataclass(frozen=True)
class MixedPosition:
    """Where a :class:`MixedStream` stands: each source's ``(epoch, records read)`` and batches drawn from it."""

    positions: tuple[tuple[int, int], ...]
    counts: tuple[int, ...]

    @classmethod
    def start(cls, sources: int) -> MixedPosition:
        return cls(((0, 0),) * sources, (0,) * sources)

    @property
    def draws(self) -> int:
        return sum(self.counts)

    def to_state(self) -> dict[str, list[Any]]:
        """Plain lists for a checkpoint (``torch.load(weights_only=True)`` reads them)."""
        return {"positions": [list(p) for p in self.positions], "counts": list(self.counts)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MixedPosition:
        positions = tuple((int(p[0]), int(p[1])) for p in state["positions"])
        counts = tuple(int(c) for c in state["counts"])
        if len(positions) != len(counts):
            raise ValueError("a mixed data position needs one count per source")
        return cls(positions, counts)


class MixedStream:
    """Several :class:`BatchStream` s mixed by ratio, as the reference's ``MultiIterLoader``.

    ``MultiIterLoader.__next__``: ``random.choices(range(len(loaders)), ratios, k=1)[0]`` with the ratios
    normalised to sum 1, then ``next()`` of that loader — one batch of one source per step, each source with its
    own batch size.  ``rng`` plays the reference's global ``random`` (seeded ``seed + rank`` by ``setup_seeds``):
    each step draws from it exactly once, when the batch is asked for, so a caller that also draws prompts from
    it sees the reference's order (source, then prompt).  Saving ``rng``'s state is the caller's job.
    """

    def __init__(
        self, streams: Sequence[BatchStream], ratios: Sequence[float], names: Sequence[str], rng: random.Random
    ) -> None:
        if not streams or len(streams) != len(ratios) or len(streams) != len(names):
            raise ValueError("a mixed stream needs one ratio and one name per source")
        if any(not ratio > 0 for ratio in ratios):
            raise ValueError(f"sample ratios must be > 0, got {list(ratios)}")
        total = float(sum(ratios))
        self.streams = list(streams)
        self.names = list(names)
        self.weights = [float(ratio) / total for ratio in ratios]
        self.rng = rng

    def choose(self) -> int:
        """Draw a source index (one ``random()`` from ``rng``, as ``random.choices``)."""
        return self.rng.choices(range(len(self.streams)), self.weights, k=1)[0]

    def start(self) -> MixedPosition:
        return MixedPosition.start(len(self.streams))

    def batches(self, position: MixedPosition | None = None) -> Iterator[Batch]:
        """The mixed batches from ``position`` on (forever); a source's stream is opened the first time it is drawn."""
        position = position or self.start()
        if len(position.positions) != len(self.streams):
            raise DataError(
                f"the data position names {len(position.positions)} source(s) but {len(self.streams)} are configured"
            )
        positions, counts = list(position.positions), list(position.counts)
        opened: dict[int, Iterator[Batch]] = {}
        try:
            while True:
                index = self.choose()
                if index not in opened:
                    opened[index] = self.streams[index].batches(positions[index])
                batch = next(opened[index])
                assert isinstance(batch.position, tuple)
                positions[index] = batch.position
                counts[index] += 1
                position = MixedPosition(tuple(positions), tuple(counts))
                yield Batch(batch.pixels, batch.texts, batch.where, position, index)
        finally:
            for iterator in opened.values():
                iterator.close()  # type: ignore[attr-defined]
