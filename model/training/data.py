"""Training data: JSONL pairs, the ``cc_sbu_align`` folder, WebDataset shards — streamed, per rank, resumable.

Sources (``[train].data``):

* **JSONL** (``*.jsonl``): one ``{"image": "relative/or/absolute.png", "text": "caption or answer"}`` a line;
  image paths are relative to the file.  The documented way to bring one's own pictures.
* **cc_sbu_align folder**: ``filter_cap.json`` (``{"annotations": [{"image_id", "caption"}]}``) and
  ``image/<image_id>.jpg`` — the published stage-2 set (reference ``CCSBUAlignBuilder``).
* **WebDataset shards**: a folder of ``*.tar``, a glob, or a brace range (``laion/{00000..10488}.tar``);
  each sample has an image (``jpg``/``jpeg``/``png``) and a caption (``txt``, else ``json["caption"]`` as
  LAION/CC/SBU are distributed).  Read tar by tar with ``webdataset``'s streaming reader, never whole.

Order and splitting.  JSONL and folders follow ``DistributedSampler``: a permutation seeded by
``seed + epoch`` (or file order with ``shuffle = false``), padded to a multiple of the world size,
rank ``r`` taking every ``world``-th index from ``r``; a last partial batch of an epoch is dropped
(``drop_last=True`` as in the reference).  Shards are split between ranks shard by shard (sample by sample
when there are fewer shards than ranks), shuffled (shard order + a 1,000-sample buffer, as the reference)
with seeds derived from ``seed``, ``epoch`` and the rank.  Either way the stream repeats forever, epoch after
epoch, and its position is ``(epoch, records read this epoch)`` — enough to resume exactly.

Bad records (unreadable picture, empty text, malformed JSONL line) are skipped, counted and the first few
named in the log (:class:`BadRecords`); with ``strict`` the first one raises :class:`DataError`.
Pictures are decoded by a thread pool (``num_workers``) in order, so batches never depend on timing.

The training loop reads its sources through :mod:`model.training.mix` (one ``data`` is a mix of one, several
``[[train.datasets]]`` are mixed by ``sample_ratio`` as the reference's ``MultiIterLoader``).
"""

from __future__ import annotations

import glob
import json
import logging
import random
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DistributedSampler

from model.image_processing import ImageProcessor, load_image

if TYPE_CHECKING:
    from model.training.mix import MixedPosition

__all__ = [
    "BadRecords",
    "Batch",
    "BatchStream",
    "DataError",
    "ListSource",
    "Record",
    "ShardSource",
    "blip_caption",
    "expand_shards",
    "open_source",
]

log = logging.getLogger("minigpt4_bot.train")

SHUFFLE_BUFFER = 1000  # the reference's wds.shuffle(1000)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class DataError(RuntimeError):
    """The training data cannot be used (or, with ``strict``, a record is bad); the text names the file."""


# ----------------------------------------------------------------------------- text


def blip_caption(caption: str, max_words: int = 50) -> str:
    """The reference's ``BlipCaptionProcessor.pre_caption`` (stage-1 captions).

    Lower-case, ``.!"()*#:;~`` → space, runs of whitespace → one space, strip, keep the first 50 words.
    """
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


# ----------------------------------------------------------------------------- bad records


class BadRecords:
    """Counts skipped records by reason and names the first few in the log (rank 0 only)."""

    def __init__(self, strict: bool = False, named: int = 5, emit: bool = True) -> None:
        self.strict = strict
        self.named = named
        self.emit = emit
        self.counts: dict[str, int] = {}
        self.examples: list[str] = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, where: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {reason} (strict mode: fix or remove it, or run without --strict to skip it)")
        kind = reason.split(":")[0]
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < self.named:
            self.examples.append(f"{where}: {reason}")
            if self.emit:
                log.warning("skipping %s: %s", where, reason)
                if len(self.examples) == self.named:
                    log.warning("further bad records are skipped and counted without being named")


# ----------------------------------------------------------------------------- records and sources


@dataclass(frozen=True)
class Record:
    """One picture + text before decoding; ``where`` names it in messages (``file:line``, ``shard.tar:key``)."""

    where: str
    image: str | bytes | None
    text: str


class ListSource:
    """Records held as a list (JSONL, cc_sbu_align): ``DistributedSampler`` order, last partial batch dropped."""

    drop_last = True

    def __init__(self, records: Sequence[Record], name: str) -> None:
        self.records = list(records)
        self.name = name

    def __len__(self) -> int:
        return len(self.records)

    def indices(self, epoch: int, rank: int, world: int, shuffle: bool, seed: int) -> list[int]:
        """This rank's indices for one epoch: ``DistributedSampler(shuffle, seed)`` at ``set_epoch(epoch)``."""
        # torch types the dataset as a Dataset; the sampler only takes its len(), so a range serves
        sampler: DistributedSampler[int] = DistributedSampler(
            range(len(self.records)),  # type: ignore[arg-type]
            num_replicas=world,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
        )
        sampler.set_epoch(epoch)
        return list(sampler)

    def epoch(self, epoch: int, rank: int, world: int, shuffle: bool, seed: int, skip: int) -> Iterator[Record]:
        for index in self.indices(epoch, rank, world, shuffle, seed)[skip:]:
            yield self.records[index]


class ShardSource:
    """WebDataset ``.tar`` shards, streamed; a partial batch carries over into the next epoch."""

    drop_last = False

    def __init__(self, shards: Sequence[str], name: str, bad: BadRecords) -> None:
        self.shards = list(shards)
        self.name = name
        self.bad = bad

    def _rank_stream(self, epoch: int, rank: int, world: int, shuffle: bool, seed: int) -> Iterator[dict[str, Any]]:
        order = list(self.shards)
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        by_shard = len(order) >= world
        mine = order[rank::world] if by_shard else order
        index = 0
        for shard in mine:
            for sample in self._read(shard):
                if by_shard or index % world == rank:
                    yield sample
                index += 1

    def _read(self, shard: str) -> Iterator[dict[str, Any]]:
        from webdataset import tariterators

        def handler(exc: Exception) -> bool:
            self.bad.add(shard, f"unreadable shard: {exc}")
            return True

        yield from tariterators.tarfile_samples([{"url": shard}], handler=handler)

    def epoch(self, epoch: int, rank: int, world: int, shuffle: bool, seed: int, skip: int) -> Iterator[Record]:
        stream = self._rank_stream(epoch, rank, world, shuffle, seed)
        if shuffle:
            stream = _buffer_shuffle(stream, random.Random((seed * 1_000_003 + epoch) * 1009 + rank))
        for i, sample in enumerate(stream):
            if i >= skip:
                yield self._record(sample)

    @staticmethod
    def _record(sample: dict[str, Any]) -> Record:
        where = f"{Path(str(sample.get('__url__', '?'))).name}:{sample.get('__key__', '?')}"
        image = next((sample[k] for k in IMAGE_EXTENSIONS if isinstance(sample.get(k), bytes)), None)
        text = ""
        if isinstance(sample.get("txt"), bytes):
            text = sample["txt"].decode("utf-8", errors="replace")
        elif isinstance(sample.get("json"), bytes):
            try:
                meta = json.loads(sample["json"])
                text = str(meta.get("caption", "")) if isinstance(meta, dict) else ""
            except ValueError:
                text = ""
        return Record(where, image, text)


def _buffer_shuffle(stream: Iterator[Any], rng: random.Random, size: int = SHUFFLE_BUFFER) -> Iterator[Any]:
    """A reservoir shuffle like ``webdataset.shuffle``: fill a buffer, emit a random element for each new one."""
    buffer: list[Any] = []
    for item in stream:
        buffer.append(item)
        if len(buffer) >= size:
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
    while buffer:
        k = rng.randrange(len(buffer))
        buffer[k], buffer[-1] = buffer[-1], buffer[k]
        yield buffer.pop()


def expand_shards(spec: str) -> list[str]:
    """A folder of ``*.tar``, a glob, or a brace range (``a/{000..009}.tar::b/*.tar``) → sorted existing shards."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar"))
    from webdataset.shardlists import expand_urls  # brace ranges; "::" joins several lists (laion::cc_sbu)

    patterns = expand_urls(spec)
    found: list[str] = []
    for pattern in patterns:
        matches = glob.glob(str(Path(pattern).expanduser())) if any(c in pattern for c in "*?[") else [pattern]
        found += [m for m in matches if Path(m).is_file()]
    return sorted(dict.fromkeys(found))


def _read_jsonl(path: Path, bad: BadRecords) -> list[Record]:
    records: list[Record] = []
    base = path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            entry = json.loads(line)
        except ValueError as exc:
            bad.add(where, f"malformed line: {exc}")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or "text" not in entry:
            bad.add(where, 'malformed line: expected {"image": "path", "text": "..."}')
            continue
        text = entry["text"]
        if not isinstance(text, str) or not text.strip():
            bad.add(where, "empty text")
            continue
        image = Path(entry["image"]).expanduser()
        records.append(Record(where, str(image if image.is_absolute() else base / image), text))
    return records


def _read_cc_sbu_align(folder: Path, bad: BadRecords) -> list[Record]:
    ann_file = folder / "filter_cap.json"
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {ann_file}: {exc}") from exc
    annotations = data["annotations"] if isinstance(data, dict) and "annotations" in data else data
    if not isinstance(annotations, list):
        raise DataError(f'{ann_file}: expected {{"annotations": [{{"image_id", "caption"}}, …]}}')
    records = []
    for i, ann in enumerate(annotations):
        where = f"{ann_file.name}[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            bad.add(where, "malformed entry: no image_id")
            continue
        caption = ann.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            bad.add(where, "empty text")
            continue
        records.append(Record(where, str(folder / "image" / f"{ann['image_id']}.jpg"), caption))
    return records


def open_source(spec: str, bad: BadRecords) -> ListSource | ShardSource:
    """Recognise ``[train].data`` (see the module docstring) and open it; nothing is decoded yet."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix != ".tar":
        records = _read_jsonl(path, bad)
    elif path.is_dir() and (path / "filter_cap.json").is_file():
        records = _read_cc_sbu_align(path, bad)
    else:
        shards = expand_shards(spec)
        if not shards:
            raise DataError(
                f"{spec}: not a JSONL file, a cc_sbu_align folder (filter_cap.json + image/) or WebDataset *.tar shards"
            )
        return ShardSource(shards, spec, bad)
    if not records:
        raise DataError(f"{spec}: no usable record ({bad.total} skipped)")
    return ListSource(records, spec)


# ----------------------------------------------------------------------------- decoding and batching


@dataclass
class Batch:
    """``pixels [B, 3, S, S]`` + texts; ``position`` = where this rank's stream stands after it (for resume).

    From a :class:`MixedStream`, ``position`` is a :class:`MixedPosition` and ``source`` the drawn source's index.
    """

    pixels: torch.Tensor
    texts: list[str]
    where: list[str]
    position: tuple[int, int] | MixedPosition
    source: int = 0


@dataclass
class _Bad:
    where: str
    reason: str


@dataclass
class _EpochEnd:
    epoch: int
    complete: bool  # the whole epoch was read (not resumed part-way)


@dataclass(eq=False)
class BatchStream:
    """Infinite (or one-pass) batches of this rank's records, decoded in order by a thread pool."""

    source: ListSource | ShardSource
    processor: ImageProcessor
    text_fn: Callable[[str], str]
    bad: BadRecords
    _: KW_ONLY
    batch_size: int
    rank: int = 0
    world: int = 1
    shuffle: bool = False
    seed: int = 0
    num_workers: int = 0

    def _prepare(self, record: Record) -> tuple[torch.Tensor, str, str] | _Bad:
        text = self.text_fn(record.text)
        if not text.strip():
            return _Bad(record.where, "empty text")
        if record.image is None:
            return _Bad(record.where, "missing picture: the sample has no jpg/png")
        if isinstance(record.image, str) and not Path(record.image).is_file():
            return _Bad(record.where, f"missing picture: {record.image}")
        try:
            image = load_image(record.image)
            return self.processor(image), text, record.where
        except Exception as exc:  # ImageDecodeError, or whatever else a broken file raises: the run goes on
            name = record.image if isinstance(record.image, str) else "picture"
            return _Bad(record.where, f"unreadable picture: {name}: {exc}")

    def _records(self, position: tuple[int, int], once: bool) -> Iterator[tuple[int, int, Record] | _EpochEnd]:
        epoch, skip = position
        while True:
            offset = skip
            for record in self.source.epoch(epoch, self.rank, self.world, self.shuffle, self.seed, skip):
                offset += 1
                yield epoch, offset, record
            yield _EpochEnd(epoch, complete=skip == 0)
            if once:
                return
            epoch, skip = epoch + 1, 0

    def _decoded(self, position: tuple[int, int], once: bool) -> Iterator[tuple[int, int, Any] | _EpochEnd]:
        items = self._records(position, once)
        if self.num_workers <= 0:
            for item in items:
                yield item if isinstance(item, _EpochEnd) else (item[0], item[1], self._prepare(item[2]))
            return
        lookahead = max(2 * self.batch_size, 4 * self.num_workers)
        pending: deque[_EpochEnd | tuple[int, int, Future[Any]]] = deque()
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="decode") as pool:
            try:
                for item in items:
                    if isinstance(item, _EpochEnd):
                        pending.append(item)
                    else:
                        pending.append((item[0], item[1], pool.submit(self._prepare, item[2])))
                    while len(pending) > lookahead or (pending and isinstance(pending[0], _EpochEnd)):
                        yield _resolve(pending.popleft())
                while pending:
                    yield _resolve(pending.popleft())
            finally:
                for entry in pending:
                    if not isinstance(entry, _EpochEnd):
                        entry[2].cancel()

    def batches(self, position: tuple[int, int] = (0, 0), *, once: bool = False) -> Iterator[Batch]:
        """Batches from ``position`` on; ``once`` = a single pass that keeps the last partial batch (evaluation)."""
        pixels: list[torch.Tensor] = []
        texts: list[str] = []
        wheres: list[str] = []
        good_this_epoch = batches_this_epoch = 0
        for item in self._decoded(position, once):
            if isinstance(item, _EpochEnd):
                if item.complete and good_this_epoch == 0:
                    raise DataError(
                        f"{self.source.name}: no usable sample in a whole pass over the data "
                        f"(rank {self.rank}; {self.bad.total} skipped)"
                    )
                if item.complete and self.source.drop_last and batches_this_epoch == 0 and not once:
                    raise DataError(
                        f"{self.source.name}: a whole pass gave rank {self.rank} only {good_this_epoch} usable "
                        f"sample(s), fewer than batch_size = {self.batch_size} ({self.bad.total} skipped)"
                    )
                if once:
                    break
                good_this_epoch = batches_this_epoch = 0
                if self.source.drop_last:
                    pixels, texts, wheres = [], [], []
                continue
            epoch, offset, value = item
            if isinstance(value, _Bad):
                self.bad.add(value.where, value.reason)
                continue
            good_this_epoch += 1
            pixels.append(value[0])
            texts.append(value[1])
            wheres.append(value[2])
            if len(pixels) == self.batch_size:
                batches_this_epoch += 1
                yield Batch(torch.stack(pixels), texts, wheres, (epoch, offset))
                pixels, texts, wheres = [], [], []
        if once and pixels:
            yield Batch(torch.stack(pixels), texts, wheres, (0, 0))


def _resolve(entry: _EpochEnd | tuple[int, int, Future[Any]]) -> Any:
    if isinstance(entry, _EpochEnd):
        return entry
    return entry[0], entry[1], entry[2].result()
