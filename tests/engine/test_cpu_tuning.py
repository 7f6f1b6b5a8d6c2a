"""The engine's CPU tuning (model.engine.cpu_tuning): weights laid out for the fast GEMM path, malloc kept warm.

The layout must keep every weight's values and shape (only the strides change) and leave the model's
answers the reference's: the engine parity tests run on a laid-out model; here the LLM's logits are
compared with an untouched copy, and the start-up log names both settings.
"""

from __future__ import annotations

import asyncio
import copy
import ctypes
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import ask, bounded, greedy

from model.engine import Engine
from model.engine.cpu_tuning import keep_freed_memory, lay_out_for_cpu

ROOT = Path(__file__).resolve().parents[2]


def _plain(module):
    """A copy with every linear weight in PyTorch's usual layout (the shared test models are laid out already)."""
    copied = copy.deepcopy(module)
    for sub in copied.modules():
        if isinstance(sub, torch.nn.Linear):
            sub.weight.data = sub.weight.data.contiguous()
    return copied


def test_the_layout_keeps_values_and_shapes_and_is_done_once() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4, bias=False))
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    assert lay_out_for_cpu(net) == 2
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name]) and p.shape == before[name].shape
        if p.dim() == 2:
            assert not p.is_contiguous() and p.t().is_contiguous()  # [out, in] stored as [in, out]
    assert lay_out_for_cpu(net) == 0  # already laid out: nothing copied again
    x = torch.randn(5, 8)
    reference = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(
        x, before["0.weight"], before["0.bias"])), before["2.weight"])  # fmt: skip
    torch.testing.assert_close(net(x), reference, rtol=1e-5, atol=1e-6)


def test_the_laid_out_llm_gives_the_same_logits_and_greedy_ids(m) -> None:
    original = _plain(m.llm)
    laid_out = _plain(m.llm)
    assert lay_out_for_cpu(laid_out) > 0
    ids = torch.randint(3, m.llm.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = original(input_ids=ids).logits, laid_out(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_malloc_keeps_freed_memory_where_the_c_library_has_mallopt() -> None:
    """In a fresh process: True on glibc, idempotent; elsewhere (musl) it reports False instead of failing."""
    code = "from model.engine.cpu_tuning import keep_freed_memory as k; print(k(), k())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    has_mallopt = hasattr(ctypes.CDLL(None), "mallopt")
    assert out.stdout.split() == ([str(has_mallopt)] * 2)
    assert keep_freed_memory() is has_mallopt


def test_the_engine_tunes_a_cpu_host_at_start_and_says_so(m, caplog) -> None:
    model = _plain(m)

    async def main():
        async with Engine(model) as eng:
            await eng.generate(ask(model, "Describe it.", greedy(model, 2)))

    with caplog.at_level(logging.INFO, logger="model.engine.engine"):
        asyncio.run(bounded(main()))
    text = caplog.text
    assert "linear weights laid out for the CPU GEMM" in text
    assert ("malloc keeps freed memory" in text) == hasattr(ctypes.CDLL(None), "mallopt")
    assert model.llm.lm_head.weight.t().is_contiguous()
