"""The training batch: the reference's ids, labels, loss, gradients (../shared/parity/train); hand-built layouts."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from model.training.batch import IGNORE_INDEX, VISUAL_ID, BatchBuilder
from model.training.data import blip_caption
from model.training.loss import LossModule as _LossModule
from model.training.loss import text_tensors as _text_tensors
from tests.training.helpers import PARITY, TRAIN_FIXTURES

EXPECTED = json.loads((TRAIN_FIXTURES / "expected.json").read_text())["stage2"]


@contextlib.contextmanager
def projection_trainable(model) -> Iterator[None]:
    """Make the shared parity model's projection trainable for one test, then put it back."""
    model.llama_proj.requires_grad_(True)
    try:
        yield
    finally:
        model.llama_proj.zero_grad(set_to_none=True)
        model.llama_proj.requires_grad_(False)


def _stage2_builder(model) -> BatchBuilder:
    cfg = EXPECTED["model_cfg"]
    return BatchBuilder(model.tokenizer, num_visual_tokens=8, end_sym=cfg["end_sym"], max_txt_len=cfg["max_txt_len"])


def test_train_reference_stage2_batch_ids_mask_targets(parity_model):
    builder = _stage2_builder(parity_model)
    assert builder.pad_id == EXPECTED["model_cfg"]["pad_token_id"] == 417
    prompt = EXPECTED["model_cfg"]["prompt_list"][0]
    segments = prompt.split("<ImageHere>")
    assert builder._ids(segments) == EXPECTED["prompt_segment_token_ids"][0]
    regress = builder.answer_ids(EXPECTED["answers_raw"])
    assert [len(r) for r in regress] == EXPECTED["regress_untruncated_len"]
    assert regress[0] == EXPECTED["regress_token_ids"][0]
    assert regress[1] == EXPECTED["regress_token_ids"][1][: len(regress[1])]

    batch = builder.build(EXPECTED["answers_raw"], prompt)
    assert batch.input_ids.shape == (2, EXPECTED["seq_len"])
    np.testing.assert_array_equal(batch.input_ids.numpy(), np.load(TRAIN_FIXTURES / "stage2__input_ids.npy"))
    np.testing.assert_array_equal(batch.attention_mask.numpy(), np.load(TRAIN_FIXTURES / "stage2__attention_mask.npy"))
    np.testing.assert_array_equal(batch.labels.numpy(), np.load(TRAIN_FIXTURES / "stage2__targets.npy"))
    assert batch.num_target_tokens == EXPECTED["num_target_tokens"] == 63


def test_train_reference_stage2_loss_and_gradients(parity_model):
    builder = _stage2_builder(parity_model)
    batch = builder.build(EXPECTED["answers_raw"], EXPECTED["model_cfg"]["prompt_list"][0])
    pictures = [
        Image.open(PARITY / "images" / f"{name}_{size}.png")
        for name, size in (("shapes", "64x64"), ("stripes", "80x48"))
    ]
    pixels = torch.stack([parity_model.preprocess(p) for p in pictures])
    with projection_trainable(parity_model):
        loss = _LossModule(parity_model)(pixels, _text_tensors(batch, parity_model.device))
        loss.backward()
        assert loss.item() == pytest.approx(EXPECTED["loss"], abs=1e-5)
        grad_w = parity_model.llama_proj.weight.grad.numpy()
        grad_b = parity_model.llama_proj.bias.grad.numpy()
        np.testing.assert_allclose(
            grad_w, np.load(TRAIN_FIXTURES / "stage2__grad_llama_proj_weight.npy"), rtol=0, atol=2e-6
        )
        np.testing.assert_allclose(
            grad_b, np.load(TRAIN_FIXTURES / "stage2__grad_llama_proj_bias.npy"), rtol=0, atol=2e-6
        )


def _tok(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False).input_ids


def test_train_stage2_labels_token_by_token(parity_model):
    """[BOS][seg0][8 visual][seg1][answer + ###][pad]: hand-laid, row by row."""
    m = parity_model
    template = "###Human: {} ###Assistant: "
    prompt = template.format("<Img><ImageHere></Img> What is it?")
    seg0, seg1 = _tok(m, "###Human: <Img>"), _tok(m, "</Img> What is it? ###Assistant: ")
    long_answer, short_answer = _tok(m, "a red circle and a green square###"), _tok(m, "stripes###")
    batch = BatchBuilder(m.tokenizer, num_visual_tokens=8, end_sym="###", max_txt_len=160).build(
        ["a red circle and a green square", "stripes"], prompt
    )
    prefix = [1, *seg0, *[VISUAL_ID] * 8, *seg1]
    pad = len(long_answer) - len(short_answer)
    expected_ids = [prefix + long_answer, prefix + short_answer + [417] * pad]
    expected_labels = [
        [IGNORE_INDEX] * len(prefix) + long_answer,
        [IGNORE_INDEX] * len(prefix) + short_answer + [IGNORE_INDEX] * pad,
    ]
    expected_mask = [[1] * len(expected_ids[0]), [1] * (len(prefix) + len(short_answer)) + [0] * pad]
    assert batch.input_ids.tolist() == expected_ids
    assert batch.labels.tolist() == expected_labels
    assert batch.attention_mask.tolist() == expected_mask
    assert short_answer[-1] == m.tokenizer.convert_tokens_to_ids("###")  # the end symbol is a target


def test_train_stage1_labels_token_by_token(parity_model):
    """Stage 1: no prompt — [BOS][visual tokens][caption + "\\n"][pad]; BLIP caption processing; 32-token cap."""
    m = parity_model
    captions = [blip_caption('A "Red" circle: next to (a) square!!'), blip_caption("word " * 80)]
    assert captions[0] == "a red circle next to a square"
    assert captions[1] == " ".join(["word"] * 50)
    batch = BatchBuilder(m.tokenizer, num_visual_tokens=8, end_sym="\n", max_txt_len=32).build(captions, None)
    first = _tok(m, "a red circle next to a square\n")
    second = _tok(m, " ".join(["word"] * 50) + "\n")[:32]  # truncated: the end symbol is cut off
    assert first[-1] == 13 and len(second) == 32 and second[-1] != 13
    prefix = [1, *[VISUAL_ID] * 8]
    assert batch.input_ids.tolist() == [prefix + first + [417] * (32 - len(first)), prefix + second]
    assert batch.labels.tolist() == [
        [IGNORE_INDEX] * 9 + first + [IGNORE_INDEX] * (32 - len(first)),
        [IGNORE_INDEX] * 9 + second,
    ]
    assert batch.attention_mask[0].tolist() == [1] * (9 + len(first)) + [0] * (32 - len(first))


def test_train_llama2_template_pad_and_end_symbol(parity_model):
    """LLaMA-2 stage 2: '[INST] {} [/INST] ', end '</s>' (id 2); a literal '$$' in an answer is not a target."""
    m = parity_model
    prompt = "[INST] {} [/INST] ".format("<Img><ImageHere></Img> Hi")
    batch = BatchBuilder(m.tokenizer, num_visual_tokens=4, end_sym="</s>", max_txt_len=160).build(
        ["costs 5 $$ now"], prompt
    )
    answer = _tok(m, "costs 5 $$ now</s>")
    assert answer[-1] == 2 and 417 in answer
    prefix = [1, *_tok(m, "[INST] <Img>"), *[VISUAL_ID] * 4, *_tok(m, "</Img> Hi [/INST] ")]
    assert batch.input_ids[0].tolist() == prefix + answer
    assert batch.labels[0].tolist() == [IGNORE_INDEX] * len(prefix) + [IGNORE_INDEX if t == 417 else t for t in answer]
    assert batch.attention_mask[0].tolist() == [1] * (len(prefix) + len(answer))


def test_train_blip_caption_processor():
    assert blip_caption("Hello.  World!\n") == "hello world"
    assert blip_caption('x.!"()*#:;~y') == "x y"
    assert blip_caption("  Keep, commas - and ' quotes  ") == "keep, commas - and ' quotes"
    assert blip_caption("...") == ""
