"""Several datasets mixed by ``sample_ratio`` (the reference's stage-1 LAION + CC/SBU recipe, ``MultiIterLoader``)."""

from __future__ import annotations

import json
import logging
import random
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch

from model.training.data import BadRecords, open_source
from model.training.loop import Trainer, TrainError
from model.training.mix import MixedBadRecords, MixedPosition, MixedStream
from model.training.settings import TrainConfigError, config_from_dict, load_train_config
from tests.training.helpers import ANSWERS, EXTRA, PARITY, read_log, write_pairs
from tests.training.test_train_data import _stream, _texts, write_shards

PICTURES = ("shapes_64x64.png", "stripes_80x48.png")


def _jsonl(path: Path, prefix: str, count: int) -> str:
    lines = [
        json.dumps({"image": str(PARITY / "images" / PICTURES[i % 2]), "text": f"{prefix}{i}"}) for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _mix(folder: Path, ratios=(3, 1), seed: int = 42, **kwargs) -> MixedStream:
    """Source ``a``: 6 JSONL records, batch 2; source ``b``: 3 WebDataset shards × 2 samples, batch 1."""
    if not (folder / "a.jsonl").exists():
        _jsonl(folder / "a.jsonl", "a", 6)
        write_shards(folder / "b", per_shard=2, shards=3)
    streams = [
        _stream(open_source(str(folder / "a.jsonl"), BadRecords()), 2, **kwargs),
        _stream(open_source(str(folder / "b"), BadRecords()), 1, **kwargs),
    ]
    return MixedStream(streams, list(ratios), ["a", "b"], random.Random(seed))


def test_train_mix_draw_frequencies_follow_the_ratios_and_each_source_keeps_its_order(tmp_path):
    mix = _mix(tmp_path)
    batches = mix.batches()
    got = [next(batches) for _ in range(400)]
    drawn = Counter(batch.source for batch in got)
    # source a is drawn with p = 3/4: Binomial(400, 3/4) has mean 300 and std sqrt(400 · 3/4 · 1/4) = 8.66;
    # 35 ≈ 4 std, so a correct mix fails this with probability < 1e-4 (and the seeded draw is fixed anyway)
    assert abs(drawn[0] - 300) <= 35, drawn
    assert got[-1].position.counts == (drawn[0], drawn[1])  # type: ignore[union-attr]
    # one batch of one source per step, with that source's batch size, in that source's own order
    assert {len(b.texts) for b in got if b.source == 0} == {2} and {len(b.texts) for b in got if b.source == 1} == {1}
    assert [b.texts for b in got if b.source == 0] == _texts(mix.streams[0], drawn[0])
    assert [b.texts for b in got if b.source == 1] == _texts(mix.streams[1], drawn[1])


def test_train_mix_choices_are_the_reference_multiiterloader_reproducible_and_per_rank(tmp_path):
    """``MultiIterLoader``: ``random.choices(range(n), [r / sum(ratios)], k=1)[0]`` on the global ``random`` that
    ``train.py setup_seeds`` seeded with ``seed + rank`` (the module's functions are one hidden ``Random``)."""
    sequences = []
    for rank in (0, 1):
        mix = _mix(tmp_path, ratios=(115, 14), seed=42 + rank)
        ours = [mix.choose() for _ in range(2000)]
        reference = random.Random(42 + rank)
        weights = [float(r) / sum((115, 14)) for r in (115, 14)]
        assert ours == [reference.choices(range(2), weights, k=1)[0] for _ in range(2000)]
        again = _mix(tmp_path, ratios=(115, 14), seed=42 + rank)
        assert [again.choose() for _ in range(2000)] == ours  # reproducible for a seed
        assert abs(ours.count(1) - 2000 * 14 / 129) <= 4 * (2000 * 14 / 129 * 115 / 129) ** 0.5
        sequences.append(ours)
    assert sequences[0] != sequences[1]  # each rank draws its own sequence
    with pytest.raises(ValueError, match="must be > 0"):
        MixedStream(_mix(tmp_path).streams, [1, 0], ["a", "b"], random.Random(0))


def test_train_mix_resumes_from_a_saved_position_with_exactly_the_remaining_batches(tmp_path):
    settings = dict(shuffle=True, seed=3, num_workers=2)
    mix = _mix(tmp_path, **settings)
    batches = mix.batches()
    whole, states = [], []
    for _ in range(30):
        whole.append(next(batches))
        states.append(mix.rng.getstate())
    batches.close()  # type: ignore[attr-defined]
    for cut in (0, 11, 20):
        saved = json.loads(json.dumps(whole[cut].position.to_state()))  # type: ignore[union-attr]
        position = MixedPosition.from_state(saved)
        assert position.draws == cut + 1
        resumed = _mix(tmp_path, **settings)
        resumed.rng.setstate(states[cut])
        it = resumed.batches(position)
        rest = [next(it) for _ in range(29 - cut)]
        assert [(b.source, b.texts) for b in rest] == [(b.source, b.texts) for b in whole[cut + 1 :]]
        assert [b.position for b in rest] == [b.position for b in whole[cut + 1 :]]
    wrong = MixedPosition.start(3)
    with pytest.raises(Exception, match="names 3 source"):
        next(_mix(tmp_path).batches(wrong))


def test_train_mix_bad_records_are_counted_per_source_and_in_total(tmp_path):
    a, b = BadRecords(), BadRecords()
    a.add("a.jsonl:1", "missing picture: x.png")
    a.add("a.jsonl:2", "empty text")
    b.add("b.tar:7", "empty text")
    mixed = MixedBadRecords({"laion": a, "cc_sbu": b})
    assert mixed.total == 3
    assert mixed.counts == {"missing picture": 1, "empty text": 2}
    assert mixed.by_source() == {"laion": 2, "cc_sbu": 1}


# ----------------------------------------------------------------------------- configuration


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_train_mix_config_tables_names_ratios_and_relative_paths(tmp_path):
    (tmp_path / "sets").mkdir()
    _jsonl(tmp_path / "sets" / "pairs.jsonl", "p", 2)
    write_shards(tmp_path / "sets" / "laion", per_shard=1, shards=2)
    path = _write(
        tmp_path / "train.toml",
        "[train]\nstage = 1\nbatch_size = 4\n"
        '[[train.datasets]]\ndata = "sets/laion/shard-{00000..00001}.tar"\nsample_ratio = 115\n'
        '[[train.datasets]]\nname = "mine"\ndata = "sets/pairs.jsonl"\nsample_ratio = 14\nbatch_size = 2\n',
    )
    config = load_train_config(path, check_paths=False)
    train = config.train
    assert train.mixed and not train.data
    assert [(d.name, d.sample_ratio, d.batch_size) for d in train.datasets] == [("laion", 115, 4), ("mine", 14, 2)]
    assert train.datasets[0].data == str(tmp_path / "sets/laion/shard-{00000..00001}.tar")
    assert train.datasets[1].data == str(tmp_path / "sets" / "pairs.jsonl")
    assert config.to_dict()["datasets"]["train"]["laion"]["sample_ratio"] == 115
    # train_config.json (what --resume reads) gives the same settings back
    saved = json.loads(json.dumps({"model": config.model.model_dump(), "train": train.model_dump()}))
    assert config_from_dict(saved, tmp_path, "saved", check_paths=False).train == train


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ('data = "a.jsonl"\n[[train.datasets]]\ndata = "b.jsonl"\n', r"train: set either data .* not both"),
        (
            '[[train.datasets]]\ndata = "a.jsonl"\nsample_ratio = 0\n',
            r"train\.datasets\[0\]\.sample_ratio: .*greater than 0",
        ),
        (
            '[[train.datasets]]\ndata = "a.jsonl"\n[[train.datasets]]\ndata = "b.jsonl"\nsample_ratio = -14\n',
            r"train\.datasets\[1\]\.sample_ratio: .*greater than 0",
        ),
        ("[[train.datasets]]\nsample_ratio = 3\n", r"train\.datasets\[0\]\.data: Field required"),
        ('[[train.datasets]]\ndata = "a.jsonl"\nratio = 3\n', r"train\.datasets\[0\]\.ratio: unknown setting"),
        (
            '[[train.datasets]]\ndata = "x/a.jsonl"\n[[train.datasets]]\ndata = "y/a.jsonl"\n',
            r"datasets\[0\] and datasets\[1\] are both named 'a': give each",
        ),
    ],
)
def test_train_mix_config_errors_are_clear(tmp_path, train, message):
    path = _write(tmp_path / "train.toml", "[train]\n" + train)
    with pytest.raises(TrainConfigError, match=message) as info:
        load_train_config(path, check_paths=False)
    assert str(path) in str(info.value)


def test_train_mix_config_missing_data_is_named(make_config, tmp_path):
    data = _jsonl(tmp_path / "a.jsonl", "a", 2)
    path = make_config(datasets=[{"data": data}, {"name": "b", "data": "nowhere.jsonl", "sample_ratio": 2}])
    with pytest.raises(TrainConfigError, match=r"train\.datasets\[1\]\.data \(b\): .*nowhere\.jsonl does not exist"):
        load_train_config(path)
    neither = make_config(data="")
    with pytest.raises(TrainConfigError, match=r"train\.data: not set .*\[\[train\.datasets\]\]"):
        load_train_config(neither)


def test_train_mix_resume_refuses_other_data(make_config, tmp_path):
    a, b = _jsonl(tmp_path / "a.jsonl", "a", 2), _jsonl(tmp_path / "b.jsonl", "b", 2)
    mixed = Trainer(load_train_config(make_config(datasets=[{"data": a}, {"data": b}])), resume=tmp_path / "out")
    single = Trainer(load_train_config(make_config(data=a)), resume=tmp_path / "out")
    assert mixed._saved_position({"positions": [[0, 2], [1, 0]], "counts": [1, 2]}) == MixedPosition(
        ((0, 2), (1, 0)), (1, 2)
    )
    with pytest.raises(TrainError, match=r"on one data source but 2 \[\[train\.datasets\]\]"):
        mixed._saved_position([0, 2])
    with pytest.raises(TrainError, match="mixing 2 datasets but one data source"):
        single._saved_position({"positions": [[0, 2], [1, 0]], "counts": [1, 2]})


# ----------------------------------------------------------------------------- training runs


def test_train_mix_stage1_logs_the_datasets_and_counts_the_draws(
    make_config, train_run, parity_model_table, tmp_path, caplog
):
    write_shards(tmp_path / "laion", per_shard=2, shards=2)
    pairs = _jsonl(tmp_path / "cc_sbu.jsonl", "A caption ", 4)
    datasets = [{"data": "laion", "sample_ratio": 115}, {"data": pairs, "sample_ratio": 14, "batch_size": 1}]
    with caplog.at_level(logging.INFO, logger="minigpt4_bot.train"):
        result = train_run(make_config(stage=1, datasets=datasets, max_steps=4, num_workers=2))
    assert "2 datasets, one batch per step from one of them (probability sample_ratio / 129)" in caplog.text
    assert "laion (sample_ratio 115 = 89.1%, batch 2" in caplog.text
    assert "cc_sbu (sample_ratio 14 = 10.9%, batch 1" in caplog.text
    log = read_log(result.output_dir)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [sum(r["drawn"].values()) for r in log] == [1, 2, 3, 4]  # one batch of one dataset per step
    assert result.drawn == log[-1]["drawn"] and set(result.drawn) == {"laion", "cc_sbu"}
    saved = torch.load(result.output_dir / "checkpoint_last.pth", weights_only=True)
    (rank,) = saved["resume"]["ranks"]
    assert rank["position"]["counts"] == [result.drawn["laion"], result.drawn["cc_sbu"]]
    assert set(saved["config"]["datasets"]["train"]) == {"laion", "cc_sbu"}


def test_train_mix_ctrl_c_and_resume_continue_with_the_batches_of_an_uninterrupted_run(
    make_config, train_run, tmp_path
):
    """Two sources (3 : 1, their own batch sizes), shuffled, two prompts: the resumed run's log and weights equal
    the uninterrupted run's bit for bit, and both datasets are drawn before and after the cut."""
    prompts = "<Img><ImageHere></Img> Describe this image in detail.\n<Img><ImageHere></Img> What is shown?\n"
    settings = dict(
        max_steps=7, shuffle=True, num_workers=2, init_lr=1e-2, warmup_steps=2, warmup_lr=1e-3,
        iters_per_epoch=3, max_epoch=3, seed=5,
    )  # fmt: skip

    def config(folder: Path) -> Path:
        folder.mkdir()
        (folder / "prompts.txt").write_text(prompts)
        a = write_pairs(
            folder, [("shapes_64x64.png", ANSWERS[0]), ("stripes_80x48.png", ANSWERS[1]), *EXTRA], "a.jsonl"
        )
        b = write_pairs(folder, [("stripes_80x48.png", ANSWERS[1]), ("shapes_64x64.png", ANSWERS[0])], "b.jsonl")
        datasets = [
            {"name": "a", "data": str(a), "sample_ratio": 3},
            {"name": "b", "data": str(b), "sample_ratio": 1, "batch_size": 1},
        ]
        return make_config(folder, datasets=datasets, **settings)

    whole = train_run(config(tmp_path / "whole"))

    def interrupt(_trainer, step: int, _loss: float) -> None:
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    cut = config(tmp_path / "cut")
    first = train_run(cut, on_step=interrupt)
    assert first.interrupted and first.step == 3
    second = train_run(cut, resume=first.output_dir)
    assert second.step == 7 and not second.interrupted

    log = read_log(whole.output_dir)
    assert read_log(first.output_dir) == log  # loss, lr and the per-dataset draw counts of every step
    at_cut, at_end = log[2]["drawn"], log[-1]["drawn"]
    assert all(at_cut.values()) and all(at_end[n] > at_cut[n] for n in at_end), log
    a, b = (torch.load(r.output_dir / "checkpoint_last.pth", weights_only=True) for r in (second, whole))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), name
    assert a["resume"]["ranks"][0]["position"] == b["resume"]["ranks"][0]["position"]
