"""Data parallel: a 2-process ``torchrun`` (gloo, CPU) run = one process averaging the two ranks' mean losses."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.training.batch import BatchBuilder
from model.training.checkpoint import trainable_named_parameters
from model.training.loss import LossModule as _LossModule
from model.training.loss import text_tensors as _text_tensors
from model.training.optim import build_optimizer
from tests.training.helpers import ANSWERS, EXTRA, PARITY, ROOT, read_log, write_pairs
from tests.training.test_train_batch import projection_trainable

PAIRS = [("shapes_64x64.png", ANSWERS[0]), ("stripes_80x48.png", ANSWERS[1]), *EXTRA]


def _torchrun(config: Path) -> str:
    """``torchrun --nproc_per_node 2 -m bot.cli train --config config`` (gloo, CPU) → its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "bot.cli", "train", "--config", str(config)]  # fmt: skip
    # its own process group, so that a timeout ends torchrun *and* its workers
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("torchrun did not finish in 180 s:\n" + output[-3000:])
    assert proc.returncode == 0, output[-3000:]
    return output


def test_train_torchrun_two_processes_average_the_rank_losses(make_config, parity_model, tmp_path):
    config = make_config(data=str(write_pairs(tmp_path, PAIRS)), max_steps=1, init_lr=1e-2, warmup_steps=0)
    _torchrun(config)
    out = tmp_path / "out"
    (record,) = read_log(out)
    saved = torch.load(out / "checkpoint_1.pth", weights_only=True)
    assert saved["resume"]["world_size"] == 2 and len(saved["resume"]["ranks"]) == 2

    # one process: rank r's batch is records r, r + 2 (DistributedSampler, shuffle = false); mean of the rank means
    builder = BatchBuilder(parity_model.tokenizer, num_visual_tokens=8, end_sym="###", max_txt_len=160)
    prompt = "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "
    module = _LossModule(parity_model)
    with projection_trainable(parity_model):
        rank_losses = []
        for rank in (0, 1):
            rows = PAIRS[rank::2]
            pixels = torch.stack([parity_model.preprocess(Image.open(PARITY / "images" / p)) for p, _ in rows])
            batch = builder.build([t for _, t in rows], prompt)
            rank_losses.append(module(pixels, _text_tensors(batch, parity_model.device)))
        loss = (rank_losses[0] + rank_losses[1]) / 2
        loss.backward()
        copies = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in trainable_named_parameters(parity_model)]
        for (_, copy), (_, param) in zip(copies, trainable_named_parameters(parity_model), strict=True):
            copy.grad = param.grad.clone()
    optimizer = build_optimizer(copies, init_lr=1e-2, weight_decay=0.05)
    optimizer.step()

    assert record["loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert record["lr"] == pytest.approx(1e-2)
    for name, copy in copies:
        torch.testing.assert_close(saved["model"][name], copy.detach(), rtol=0, atol=1e-6)
    # Adam's first step is nearly sign(g): check the gradient itself through the saved moments (exp_avg = 0.1 g)
    state = saved["optimizer"]["state"]
    groups = saved["optimizer"]["param_groups"]
    by_name = dict(copies)
    for group, names in zip(groups, (["llama_proj.weight"], ["llama_proj.bias"]), strict=True):
        (index,) = group["params"]
        torch.testing.assert_close(state[index]["exp_avg"], 0.1 * by_name[names[0]].grad, rtol=1e-4, atol=1e-8)


def test_train_torchrun_each_process_draws_its_own_datasets_as_the_reference(make_config, tmp_path):
    """Stage 1 on two datasets (3 : 1): rank r draws as the reference's ``MultiIterLoader`` on ``random`` seeded
    ``seed + r``; ``log.jsonl`` counts the draws of both processes."""
    a = write_pairs(tmp_path, PAIRS, "a.jsonl")
    b = write_pairs(tmp_path, PAIRS[:2], "b.jsonl")
    datasets = [{"name": "a", "data": str(a), "sample_ratio": 3}, {"name": "b", "data": str(b), "sample_ratio": 1}]
    steps = 6
    _torchrun(make_config(stage=1, datasets=datasets, batch_size=1, max_steps=steps, seed=5))
    out = tmp_path / "out"
    log = read_log(out)
    assert [sum(r["drawn"].values()) for r in log] == [2 * (i + 1) for i in range(steps)]
    ranks = torch.load(out / "checkpoint_last.pth", weights_only=True)["resume"]["ranks"]
    expected = []
    for rank in (0, 1):
        reference = random.Random(5 + rank)
        draws = [reference.choices(range(2), [0.75, 0.25], k=1)[0] for _ in range(steps)]
        expected.append([draws.count(0), draws.count(1)])
        assert ranks[rank]["position"]["counts"] == expected[rank]
    assert expected == [[3, 3], [4, 2]]  # seed 5: the ranks draw differently, both from both datasets
    assert log[-1]["drawn"] == {"a": expected[0][0] + expected[1][0], "b": expected[0][1] + expected[1][1]}
