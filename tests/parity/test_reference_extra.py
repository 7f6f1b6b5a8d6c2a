"""Parity on extra cases produced by the unmodified reference code (tests/fixtures/reference_extra).

Covers what the public fixture holds back: the LLaMA-2 layout (no Q-Former, default-init
``ln_vision``, ``<s>`` inside the prompt), a two-turn thread with two images, left-padded
batched generation, 32-token greedy runs with repetition penalty 1.0 / 1.05, and
MiniGPT-v2 (448-style position interpolation, LoRA).  How the numbers were made:
``tests/fixtures/reference_extra/README.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import load_minigpt4
from model.generate import generate_ids

FIX = Path(__file__).resolve().parents[1] / "fixtures"
PARITY = FIX / "parity"
EXTRA = FIX / "reference_extra"
CASES = json.loads((EXTRA / "expected_extra.json").read_text())
CONFIG = json.loads((PARITY / "config.json").read_text())
VISION_KEYS = ("img_size", "patch_size", "width", "depth", "heads", "mlp_hidden", "layer_norm_eps")
ATOL = 1e-4


def _close(actual: torch.Tensor, name: str) -> None:
    expected = torch.from_numpy(np.load(EXTRA / name))
    torch.testing.assert_close(actual.detach().float().reshape(expected.shape), expected, atol=ATOL, rtol=0)


def _image(name: str) -> Image.Image:
    return Image.open(PARITY / "images" / name).convert("RGB")


def _vision(**overrides: int) -> dict:
    return {k: CONFIG["vit"][k] for k in VISION_KEYS} | overrides


def _greedy(m, ctx: torch.Tensor, n: int, rp: float) -> list[int]:
    return generate_ids(m, [ctx], max_new_tokens=n, do_sample=False, repetition_penalty=rp)[0]


def _prompt(m, case: dict, turns: list[dict]) -> str:
    """The prompt of ``turns``, checked against the reference's text and its token segments."""
    prompt = m.build_prompt(turns)
    assert prompt == case["prompt"]
    assert m.segment_token_ids(prompt) == case["segment_token_ids"]
    return prompt


def _context_logits_and_greedy(m, ctx: torch.Tensor, name: str, lengths: tuple[int, ...] = (8, 32)) -> None:
    """The context embeddings, the last position's logits and the greedy ids (each length, repetition penalty
    1.0 and 1.05) of case ``name`` match the reference's."""
    _close(ctx, f"{name}__context_embeds.npy")
    with torch.no_grad():
        _close(m.llm(inputs_embeds=ctx[None]).logits[0, -1], f"{name}__last_logits.npy")
    for n in lengths:
        for rp in ("1.0", "1.05"):
            assert _greedy(m, ctx, n, float(rp)) == CASES[name][f"greedy_ids_{n}_rp{rp}"], (n, rp)


@pytest.fixture(scope="module")
def vicuna0(parity_model):
    return parity_model


@pytest.fixture(scope="module")
def llama2(parity_llama2_model):
    return parity_llama2_model


@pytest.fixture(scope="module")
def v2():
    case = CASES["minigptv2_single"]
    return load_minigpt4(
        variant="minigptv2",
        llm=PARITY / "llama",
        vit=PARITY / "eva_vit_g.pth",
        projection=EXTRA / case["checkpoint"],
        vision=_vision(img_size=case["image_size"]),
    )


# ----------------------------------------------------------------------------- LLaMA-2 layout


def test_llama2_visual_path(llama2):
    pixels = llama2.preprocess(_image("stripes_80x48.png"))
    _close(pixels, "llama2_single__pixel_values_stripes.npy")
    out = llama2.encode_images_detailed(pixels[None])
    _close(out.vit_out[0], "llama2_single__vit_out.npy")
    _close(out.ln_vision_out[0], "llama2_single__ln_vision_out.npy")
    _close(out.grouped[0], "llama2_single__grouped_vit_tokens.npy")
    _close(out.visual_tokens[0], "llama2_single__visual_tokens.npy")
    assert torch.equal(llama2.ln_vision.weight, torch.ones(48)) and torch.equal(llama2.ln_vision.bias, torch.zeros(48))


def test_llama2_prompt_context_logits_and_greedy(llama2):
    case = CASES["llama2_single"]
    prompt = _prompt(llama2, case, [{"role": "user", "text": case["question"], "image": True}])
    tokens = llama2.encode_pil([_image(case["image"])])
    _context_logits_and_greedy(llama2, llama2.context_embeddings(prompt, tokens), "llama2_single")


# ----------------------------------------------------------------------------- two turns, two images


def test_two_turns_two_images(vicuna0):
    case = CASES["vicuna0_two_turns_two_images"]
    first, second = case["turns"]
    turns = [
        {"role": "user", "text": first["question"], "image": True},
        {"role": "assistant", "text": first["assistant_answer_fixed"]},
        {"role": "user", "text": second["question"], "image": True},
    ]
    prompt = _prompt(vicuna0, case, turns)
    images = vicuna0.encode_pil([_image(case["images"][0]), _image(case["images"][1])])
    _close(images[0], "vicuna0_two_turns_two_images__visual_tokens_image1_shapes.npy")
    _close(images[1], "vicuna0_two_turns_two_images__visual_tokens_image2_stripes.npy")
    ctx = vicuna0.context_embeddings(prompt, images)
    assert ctx.shape[0] == case["context_len"]
    _context_logits_and_greedy(vicuna0, ctx, "vicuna0_two_turns_two_images")


def test_vicuna0_single_32_token_runs_diverge_at_step_23(vicuna0):
    case = CASES["vicuna0_single"]
    prompt = vicuna0.build_prompt([{"role": "user", "text": case["question"], "image": True}])
    ctx = vicuna0.context_embeddings(prompt, vicuna0.encode_pil([_image(case["image"])]))
    plain, penalised = _greedy(vicuna0, ctx, 32, 1.0), _greedy(vicuna0, ctx, 32, 1.05)
    assert plain == case["greedy_ids_32_rp1.0"]
    assert penalised == case["greedy_ids_32_rp1.05"]
    assert next(i for i, (a, b) in enumerate(zip(plain, penalised, strict=True)) if a != b) == 22


# ----------------------------------------------------------------------------- batched generation


def test_batched_equals_reference_batched_and_unbatched(vicuna0):
    case = CASES["vicuna0_batch2_generate"]
    images = vicuna0.encode_pil([_image(name) for name in case["images"]])
    contexts = [vicuna0.context_embeddings(text, [img]) for text, img in zip(case["texts"], images, strict=True)]
    assert [c.shape[0] for c in contexts] == case["context_lens"]
    batched = generate_ids(vicuna0, contexts, max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    assert batched == case["batched_greedy_ids"] == case["unbatched_greedy_ids"]
    assert [_greedy(vicuna0, c, 8, 1.0) for c in contexts] == case["unbatched_greedy_ids"]


# ----------------------------------------------------------------------------- MiniGPT-v2


def test_minigptv2_interpolation_lora_and_greedy(v2):
    case = CASES["minigptv2_single"]
    assert v2.load_report.lora_rank == case["lora"]["r"]
    _close(v2.visual_encoder.embeddings.position_embedding[0], "minigptv2_single__pos_embed_interpolated.npy")
    pixels = v2.preprocess(_image(case["image"]))
    _close(pixels, "minigptv2_single__pixel_values_112.npy")
    out = v2.encode_images_detailed(pixels[None])
    _close(out.vit_out[0], "minigptv2_single__vit_out.npy")
    _close(out.grouped[0], "minigptv2_single__grouped_vit_tokens.npy")
    _close(out.visual_tokens[0], "minigptv2_single__visual_tokens.npy")
    prompt = _prompt(v2, case, [{"role": "user", "text": case["question"], "image": True}])
    ctx = v2.context_embeddings(prompt, [out.visual_tokens[0]])
    _context_logits_and_greedy(v2, ctx, "minigptv2_single", lengths=(8,))
