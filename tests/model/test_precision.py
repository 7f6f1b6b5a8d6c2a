"""Precision modes: fp32 reference path, half precision, and bitsandbytes on CUDA only."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from model import PrecisionError, load_minigpt4
from model.demo_weights import write_demo_weights
from model.generate import generate_ids
from model.loader import resolve_precision

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_weights(tmp_path_factory.mktemp("precision"), "vicuna0")


def test_bfloat16_on_cpu_runs_and_stays_close_to_float32(demo):
    exact = load_minigpt4(**demo.loader_kwargs(), dtype="float32")
    half = load_minigpt4(**demo.loader_kwargs(), dtype="bfloat16")
    assert half.llm_dtype == torch.bfloat16 and half.vision_dtype == torch.bfloat16
    assert half.llama_proj.weight.dtype == torch.float32  # projection and ln_vision stay fp32
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    a, b = exact.encode_images(pixels), half.encode_images(pixels)
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a, atol=0.1, rtol=0.1)
    prompt = half.build_prompt([{"role": "user", "text": "What is this?", "image": True}])
    ids = generate_ids(half, [half.context_embeddings(prompt, [b[0]])], max_new_tokens=4, do_sample=False)
    assert len(ids[0]) == 4


def test_auto_precision_resolves_per_device():
    dev, dtype = resolve_precision("auto", "auto", "none")
    assert (dev.type, dtype) == (("cuda", torch.float16) if CUDA else ("cpu", torch.float32))


@pytest.mark.parametrize(
    ("device", "dtype", "quantization", "message"),
    [
        ("cpu", "float64", "none", "dtype must be one of"),
        ("cpu", "float32", "int4", "quantization must be one of"),
        ("tpu", "float32", "none", "unknown device"),
    ],
)
def test_invalid_precision_settings(device, dtype, quantization, message):
    with pytest.raises(PrecisionError, match=message):
        resolve_precision(device, dtype, quantization)


@pytest.mark.skipif(CUDA, reason="checks the CPU-only message")
@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantization_without_cuda_says_so(quantization, demo):
    with pytest.raises(PrecisionError, match="needs a CUDA GPU"):
        load_minigpt4(**demo.loader_kwargs(), device="cpu", quantization=quantization)


@pytest.mark.skipif(CUDA, reason="checks the CPU-only message")
def test_cuda_device_without_cuda_says_so(demo):
    with pytest.raises(PrecisionError, match="no CUDA GPU"):
        load_minigpt4(**demo.loader_kwargs(), device="cuda")


@pytest.mark.gpu
@gpu
def test_float16_on_cuda_matches_float32_greedy(demo):
    exact = load_minigpt4(**demo.loader_kwargs(), device="cpu", dtype="float32")
    fast = load_minigpt4(**demo.loader_kwargs(), device="cuda", dtype="float16")
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast.encode_images(pixels).float().cpu(), exact.encode_images(pixels), atol=2e-2, rtol=0)


@pytest.mark.gpu
@gpu
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_llm_generates_on_cuda(demo, quantization):
    m = load_minigpt4(**demo.loader_kwargs(), device="cuda", quantization=quantization)
    prompt = m.build_prompt([{"role": "user", "text": "What is this?", "image": True}])
    tokens = m.encode_images(torch.zeros(1, 3, 224, 224))[0]
    assert len(generate_ids(m, [m.context_embeddings(prompt, [tokens])], max_new_tokens=4, do_sample=False)[0]) == 4
