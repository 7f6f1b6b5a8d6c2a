"""Training data: JSONL / cc_sbu_align / WebDataset shards, order, rank split, resume positions, bad records."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from model.image_processing import ImageProcessor
from model.training.data import (
    BadRecords,
    BatchStream,
    DataError,
    ListSource,
    Record,
    ShardSource,
    expand_shards,
    open_source,
)
from tests.training.helpers import PARITY, read_log

PICTURES = ("shapes_64x64.png", "stripes_80x48.png")


def _jpeg(index: int) -> bytes:
    image = Image.open(PARITY / "images" / PICTURES[index % 2]).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, per_shard: int = 3, shards: int = 3) -> list[str]:
    """``shard-00000.tar`` …: jpg + txt (one sample per shard carries its caption as json, LAION-style)."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key, text = f"{s:05d}{i:04d}", f"Caption {s}-{i}."
                _add(tar, f"{key}.jpg", _jpeg(s + i))
                if i == 1:
                    _add(tar, f"{key}.json", json.dumps({"caption": text}).encode())
                else:
                    _add(tar, f"{key}.txt", text.encode())
                texts.append(text)
    return texts


def _stream(source, batch_size: int, **kwargs) -> BatchStream:
    return BatchStream(
        source, ImageProcessor(56), lambda t: t, kwargs.pop("bad", BadRecords()), batch_size=batch_size, **kwargs
    )


def _texts(stream: BatchStream, n: int, position=(0, 0)) -> list[list[str]]:
    out, it = [], stream.batches(position)
    for _ in range(n):
        out.append(next(it).texts)
    return out


def _flat(batches: list[list[str]]) -> list[str]:
    return [text for batch in batches for text in batch]


def test_train_list_source_follows_distributed_sampler():
    source = ListSource([Record(f"r{i}", None, str(i)) for i in range(7)], "seven")
    assert source.indices(0, 0, 1, False, 42) == list(range(7))  # shuffle = false: file order
    for epoch in (0, 3):
        for rank in (0, 1):
            sampler = DistributedSampler(range(7), num_replicas=2, rank=rank, shuffle=True, seed=42)
            sampler.set_epoch(epoch)
            assert source.indices(epoch, rank, 2, True, 42) == list(sampler)
    assert source.indices(0, 1, 2, False, 0) == [1, 3, 5, 0]  # padded by repeating the start, as the sampler does


def test_train_jsonl_batches_in_file_order_drop_last_and_resume(tmp_path):
    lines = [json.dumps({"image": str(PARITY / "images" / PICTURES[i % 2]), "text": f"t{i}"}) for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    stream = _stream(open_source(str(tmp_path / "d.jsonl"), BadRecords()), 2, num_workers=2)
    assert _texts(stream, 4) == [["t0", "t1"], ["t2", "t3"], ["t0", "t1"], ["t2", "t3"]]  # t4 dropped each epoch
    batches = stream.batches()
    next(batches)
    second = next(batches)
    assert second.position == (0, 4) and second.pixels.shape == (2, 3, 56, 56)
    assert _texts(stream, 2, position=second.position) == [["t0", "t1"], ["t2", "t3"]]  # epoch 1 from the start
    ranks = [
        _texts(_stream(open_source(str(tmp_path / "d.jsonl"), BadRecords()), 1, rank=r, world=2), 3) for r in (0, 1)
    ]
    assert ranks == [[["t0"], ["t2"], ["t4"]], [["t1"], ["t3"], ["t0"]]]


def test_train_cc_sbu_align_folder(tmp_path):
    (tmp_path / "image").mkdir()
    for image_id, picture in ((2, PICTURES[0]), (7, PICTURES[1])):
        Image.open(PARITY / "images" / picture).convert("RGB").save(tmp_path / "image" / f"{image_id}.jpg")
    annotations = [{"image_id": "2", "caption": "First."}, {"image_id": "5", "caption": "No picture."},
                   {"image_id": "7", "caption": "Second."}, {"image_id": "9", "caption": ""}]  # fmt: skip
    (tmp_path / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    bad = BadRecords()
    stream = _stream(open_source(str(tmp_path), bad), 2, bad=bad)
    assert _texts(stream, 2) == [["First.", "Second."], ["First.", "Second."]]
    assert bad.counts == {"empty text": 1, "missing picture": 2}


def test_train_webdataset_shards_stream_in_order_split_by_rank_and_resume(tmp_path):
    texts = write_shards(tmp_path / "shards")
    shards = expand_shards(str(tmp_path / "shards"))
    assert [Path(s).name for s in shards] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert expand_shards(str(tmp_path / "shards" / "shard-{00000..00001}.tar")) == shards[:2]
    assert expand_shards(str(tmp_path / "shards" / "*.tar")) == shards
    source = open_source(str(tmp_path / "shards"), BadRecords())
    assert isinstance(source, ShardSource)
    one = _texts(_stream(source, 2), 6)
    assert _flat(one)[:9] == texts  # file order; the stream goes on into the next pass
    assert one[4] == [texts[8], texts[0]]  # a partial batch carries over across passes
    batches = _stream(source, 2).batches()
    [next(batches) for _ in range(2)]
    position = next(batches).position
    assert _texts(_stream(source, 2), 2, position=position) == one[3:5]
    rank1 = _flat(_texts(_stream(source, 1, rank=1, world=2), 3))
    assert rank1 == texts[3:6]  # rank 1 reads shard 1 (and then shard 1 again: shards split per rank)
    shuffled = _flat(_texts(_stream(source, 3, shuffle=True, seed=1), 3))
    assert sorted(shuffled) == sorted(texts) and shuffled != texts


def test_train_webdataset_bad_samples_are_skipped(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "a.tar", "w") as tar:
        _add(tar, "0001.jpg", _jpeg(0))
        _add(tar, "0001.txt", b"good one")
        _add(tar, "0002.jpg", b"\xff\xd8 truncated")
        _add(tar, "0002.txt", b"broken picture")
        _add(tar, "0003.txt", b"no picture at all")
        _add(tar, "0004.jpg", _jpeg(1))
        _add(tar, "0004.txt", b"   ")
        _add(tar, "0005.jpg", _jpeg(1))
        _add(tar, "0005.txt", b"good two")
    bad = BadRecords()
    assert _texts(_stream(open_source(str(folder), bad), 2, bad=bad), 1) == [["good one", "good two"]]
    assert bad.counts == {"unreadable picture": 1, "missing picture": 1, "empty text": 1}
    assert any("a.tar:0002" in e for e in bad.examples)
    with pytest.raises(DataError, match=r"a\.tar:0002: unreadable picture"):
        strict = BadRecords(strict=True)
        _texts(_stream(open_source(str(folder), strict), 2, bad=strict), 1)


def test_train_a_pass_without_enough_good_samples_is_an_error(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "missing.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match="no usable sample"):
        _texts(_stream(open_source(str(tmp_path / "d.jsonl"), BadRecords()), 1), 1)
    with pytest.raises(DataError, match="not a JSONL file, a cc_sbu_align folder"):
        open_source(str(tmp_path / "nothing-*.tar"), BadRecords())


def test_train_stage1_on_webdataset_shards(make_config, train_run, tmp_path):
    write_shards(tmp_path / "shards", per_shard=2, shards=2)
    result = train_run(make_config(stage=1, data="shards", max_steps=3, num_workers=2))
    assert [r["step"] for r in read_log(result.output_dir)] == [1, 2, 3]
    saved = torch.load(result.output_dir / "checkpoint_last.pth", weights_only=True)
    assert saved["config"]["run"]["stage"] == 1 and saved["step"] == 3
