"""LLaMA-2 layout (no Q-Former, 4-token grouping, ``<s>`` inside the prompt) and the two-turn thread.

The expected numbers for these cases are held out; what is checked here follows from the
reference rules documented in ``tests/fixtures/parity/README.md`` and from the checkpoint
files themselves.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from PIL import Image

import model

ATOL = 1e-4
QUESTION = "Describe this image in detail."
TWO_TURNS = [
    {"role": "user", "text": "Describe this image.", "image": True},
    {"role": "assistant", "text": "A red circle and a green square."},
    {"role": "user", "text": "What changed in this second picture?", "image": True},
]


@pytest.fixture(scope="module")
def stripes(parity_dir: Path) -> Image.Image:
    return Image.open(parity_dir / "images" / "stripes_80x48.png")


@pytest.fixture(scope="module")
def shapes(parity_dir: Path) -> Image.Image:
    return Image.open(parity_dir / "images" / "shapes_64x64.png")


@pytest.fixture(scope="module")
def llama2_out(parity_llama2_model: model.MiniGPT4, stripes: Image.Image) -> model.VisionOutputs:
    return parity_llama2_model.encode_images_detailed(parity_llama2_model.preprocess(stripes)[None])


@pytest.fixture(scope="module")
def llama2_prompt(parity_llama2_model: model.MiniGPT4) -> str:
    return parity_llama2_model.build_prompt([{"role": "user", "text": QUESTION, "image": True}])


@pytest.fixture(scope="module")
def sp(parity_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(parity_dir / "llama" / "tokenizer.model"))


def _legacy_ids(sp: spm.SentencePieceProcessor, text: str, first: bool) -> list[int]:
    """transformers 4.30 slow LlamaTokenizer: ``<s>`` is special, each chunk gets the dummy prefix."""
    ids = [1] if first else []
    for i, chunk in enumerate(text.split("<s>")):
        if i:
            ids.append(1)
        if chunk:
            ids += sp.encode(chunk)
    return ids


# ----------------------------------------------------------------------------- vision path


def test_ln_vision_is_default_init(parity_llama2_model, parity_expected):
    ln = parity_llama2_model.ln_vision
    assert torch.equal(ln.weight, torch.ones_like(ln.weight))
    assert torch.equal(ln.bias, torch.zeros_like(ln.bias))
    assert ln.eps == 1e-5
    assert parity_llama2_model.qformer is None and parity_llama2_model.query_tokens is None
    assert parity_expected.get("llama2_ln_vision_is_default_init", True) is True


def test_ln_vision_output_is_plain_layernorm(llama2_out):
    expected = torch.nn.functional.layer_norm(llama2_out.vit_out.float(), (48,), eps=1e-5)
    torch.testing.assert_close(llama2_out.ln_vision_out, expected, atol=1e-6, rtol=0)


def test_visual_tokens_shape(llama2_out, parity_llama2_model, stripes):
    assert tuple(llama2_out.visual_tokens.shape) == (1, 4, 64)
    assert tuple(parity_llama2_model.encode_images(parity_llama2_model.preprocess(stripes)[None]).shape) == (1, 4, 64)
    assert llama2_out.qformer_out is None


def test_grouping_drops_cls_and_concatenates_four_raster_tokens(llama2_out):
    ln = llama2_out.ln_vision_out
    assert tuple(ln.shape) == (1, 17, 48)
    grouped = llama2_out.grouped
    assert grouped is not None
    assert torch.equal(grouped, ln[:, 1:, :].reshape(1, 4, 192))
    for g in range(4):
        assert torch.equal(grouped[0, g], torch.cat(list(ln[0, 1 + 4 * g : 5 + 4 * g])))


def test_visual_tokens_are_projection_of_grouped_from_checkpoint(llama2_out, parity_dir):
    sd = torch.load(parity_dir / "pretrained_minigpt4_llama2.pth", map_location="cpu", weights_only=True)["model"]
    weight, bias = sd["llama_proj.weight"].float(), sd["llama_proj.bias"].float()
    assert tuple(weight.shape) == (64, 192)
    by_hand = llama2_out.grouped[0] @ weight.T + bias
    torch.testing.assert_close(llama2_out.visual_tokens[0].float(), by_hand, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- text path


def test_llama2_prompt_byte_exact(llama2_prompt, parity_config):
    assert llama2_prompt.encode() == parity_config["prompts"]["llama2_single"].encode()


def test_literal_bos_in_prompt_is_special_id_then_legacy_pieces(parity_llama2_model, llama2_prompt):
    tok = parity_llama2_model.tokenizer
    segments = parity_llama2_model.segment_token_ids(llama2_prompt)
    assert len(segments) == 2
    first = segments[0]
    assert first[0] == 1 and first.count(1) == 2  # BOS + the literal <s>
    at = first.index(1, 1)
    assert first[at : at + 4] == [1, *tok.convert_tokens_to_ids(["▁[", "INST", "]"])]
    # legacy=False would give "[" (no dummy prefix) after <s>; the two pieces are different ids
    assert tok.convert_tokens_to_ids("▁[") != tok.convert_tokens_to_ids("[")


def test_segment_ids_equal_sentencepiece_legacy(parity_llama2_model, llama2_prompt, sp):
    segments = parity_llama2_model.segment_token_ids(llama2_prompt)
    expected = [_legacy_ids(sp, text, i == 0) for i, text in enumerate(llama2_prompt.split("<ImageHere>"))]
    assert segments == expected
    # every segment gets the dummy prefix: "</Img>" after the image starts with "▁<"
    assert sp.id_to_piece(segments[1][0]) == "▁<"


@pytest.mark.parametrize("fixture_name", ["parity_model", "parity_llama2_model"])
def test_vicuna_segments_equal_sentencepiece_legacy(request, parity_config, sp, fixture_name):
    m = request.getfixturevalue(fixture_name)
    for prompt in parity_config["prompts"].values():
        expected = [_legacy_ids(sp, text, i == 0) for i, text in enumerate(prompt.split("<ImageHere>"))]
        assert m.segment_token_ids(prompt) == expected


# ----------------------------------------------------------------------------- two turns, two images


def test_two_turn_prompt_byte_exact(parity_model, parity_config):
    prompt = parity_model.build_prompt(TWO_TURNS)
    assert prompt.encode() == parity_config["prompts"]["vicuna0_two_turns_two_images"].encode()
    assert prompt.count("<ImageHere>") == 2


def test_two_image_context_length(parity_model, parity_config, shapes, stripes):
    prompt = parity_config["prompts"]["vicuna0_two_turns_two_images"]
    images = parity_model.encode_pil([shapes, stripes])
    ctx = parity_model.context_embeddings(prompt, images)
    segments = parity_model.segment_token_ids(prompt)
    assert len(segments) == 3
    assert ctx.shape == (sum(len(s) for s in segments) + 16, 64)
    # image tokens sit right after their segments
    start = len(segments[0])
    torch.testing.assert_close(ctx[start : start + 8], images[0], atol=0, rtol=0)
    start += 8 + len(segments[1])
    torch.testing.assert_close(ctx[start : start + 8], images[1], atol=0, rtol=0)


def test_context_embeddings_rejects_wrong_image_count(parity_model, parity_config, shapes):
    prompt = parity_config["prompts"]["vicuna0_two_turns_two_images"]
    with pytest.raises(ValueError, match="placeholder"):
        parity_model.context_embeddings(prompt, parity_model.encode_pil([shapes]))
