"""Generation: batching, per-row stops, truncation, the reference's logits processing, streaming."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import RepetitionPenaltyLogitsProcessor

import model
from model.conversation import clean_answer
from model.generate import decode_answer, default_options, generate, generate_ids, stream_answer
from model.sampling import GenerationOptions, IncrementalDetokenizer, RowSampler

TWO_TURNS = [
    {"role": "user", "text": "Describe this image.", "image": True},
    {"role": "assistant", "text": "A red circle and a green square."},
    {"role": "user", "text": "What changed in this second picture?", "image": True},
]
EOS = 2
BOS = 1
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def contexts(parity_model: model.MiniGPT4, parity_dir) -> list[torch.Tensor]:
    """Three contexts of different lengths: vicuna0_single (81), two turns with two images, plain text."""
    m = parity_model
    shapes = Image.open(parity_dir / "images" / "shapes_64x64.png")
    stripes = Image.open(parity_dir / "images" / "stripes_80x48.png")
    img_a, img_b = m.encode_pil([shapes, stripes])
    single = m.context_embeddings(
        m.build_prompt([{"role": "user", "text": "What can I cook with this?", "image": True}]), [img_a]
    )
    two = m.context_embeddings(m.build_prompt(TWO_TURNS), [img_a, img_b])
    short = m.embed_ids(m.tokenizer("Hello there").input_ids)
    assert len({single.shape[0], two.shape[0], short.shape[0]}) == 3
    return [single, two, short]


@pytest.fixture(scope="module")
def unbatched(parity_model, contexts) -> list[list[int]]:
    return [
        generate_ids(parity_model, [c], max_new_tokens=16, do_sample=False, repetition_penalty=1.0)[0] for c in contexts
    ]


# ----------------------------------------------------------------------------- batching and stops


def test_batched_equals_unbatched_greedy(parity_model, contexts, unbatched):
    batched = generate_ids(parity_model, contexts, max_new_tokens=16, do_sample=False, repetition_penalty=1.0)
    assert batched == unbatched
    assert all(len(ids) == 16 for ids in batched)
    assert len({tuple(ids) for ids in batched}) == 3


def test_batched_equals_unbatched_with_repetition_penalty(parity_model, contexts):
    alone = [generate_ids(parity_model, [c], max_new_tokens=12, do_sample=False)[0] for c in contexts]
    batched = generate_ids(parity_model, list(reversed(contexts)), max_new_tokens=12, do_sample=False)
    assert list(reversed(batched)) == alone


def test_per_row_stop_token(parity_model, contexts, unbatched):
    stop = unbatched[0][2]
    assert stop not in unbatched[1]  # precondition: only row 0 meets it
    opts = GenerationOptions.create(
        max_new_tokens=16, do_sample=False, repetition_penalty=1.0, stop_token_ids=((stop,),)
    )
    first, second = generate(parity_model, contexts[:2], opts)
    assert first.token_ids == unbatched[0][:3]
    assert first.finish_reason == "stop"
    assert second.token_ids == unbatched[1]
    assert second.finish_reason == "length"


def test_multi_token_stop_sequence_and_per_row_options(parity_model, contexts, unbatched):
    seq = tuple(unbatched[1][4:6])
    stopping = GenerationOptions.create(
        max_new_tokens=16, do_sample=False, repetition_penalty=1.0, stop_token_ids=(seq,)
    )
    plain = GenerationOptions.create(max_new_tokens=10, do_sample=False, repetition_penalty=1.0)
    a, b = generate(parity_model, contexts[:2], [plain, stopping])
    assert (a.token_ids, a.finish_reason) == (unbatched[0][:10], "length")
    assert (b.token_ids, b.finish_reason) == (unbatched[1][:6], "stop")


def test_max_length_truncates_context_from_the_left(parity_model, contexts):
    ctx = contexts[0]
    length, max_new, max_length = ctx.shape[0], 8, 50
    opts = GenerationOptions.create(max_new_tokens=max_new, max_length=max_length, do_sample=False)
    (result,) = generate(parity_model, [ctx], opts)
    cut = length + max_new - max_length
    assert result.truncated_tokens == cut == 39
    assert result.prompt_tokens == length - cut
    expected = generate_ids(parity_model, [ctx[cut:]], max_new_tokens=max_new, do_sample=False)
    assert result.token_ids == expected[0]
    untruncated = generate_ids(parity_model, [ctx], max_new_tokens=max_new, do_sample=False)
    assert result.token_ids != untruncated[0]


def test_no_truncation_within_max_length(parity_model, contexts):
    (result,) = generate(parity_model, [contexts[0]], GenerationOptions.create(max_new_tokens=4, do_sample=False))
    assert result.truncated_tokens == 0 and result.prompt_tokens == contexts[0].shape[0]


# ----------------------------------------------------------------------------- sampling and beams


def test_sampling_is_reproducible_with_a_seed(parity_model, contexts):
    ctx = contexts[0]
    first = generate_ids(parity_model, [ctx], max_new_tokens=8, do_sample=True, seed=1234)
    again = generate_ids(parity_model, [ctx], max_new_tokens=8, do_sample=True, seed=1234)
    assert first == again
    others = {tuple(generate_ids(parity_model, [ctx], max_new_tokens=8, do_sample=True, seed=s)[0]) for s in (1, 2, 3)}
    assert len(others | {tuple(first[0])}) > 1


def test_seeded_sampling_is_per_row(parity_model, contexts):
    alone = [generate_ids(parity_model, [c], max_new_tokens=8, do_sample=True, seed=7)[0] for c in contexts[:2]]
    batched = generate_ids(parity_model, contexts[:2], max_new_tokens=8, do_sample=True, seed=7)
    assert batched == alone


@pytest.mark.parametrize("beams", [1, 3])
def test_beam_search_returns_ids(parity_model, contexts, beams):
    (ids,) = generate_ids(parity_model, [contexts[2]], max_new_tokens=6, do_sample=False, num_beams=beams)
    assert 1 <= len(ids) <= 6
    assert all(isinstance(i, int) and 0 <= i < 512 for i in ids)
    (result,) = generate(
        parity_model, [contexts[2]], GenerationOptions.create(max_new_tokens=6, do_sample=False, num_beams=beams)
    )
    assert result.token_ids == ids
    assert result.finish_reason in ("length", "eos", "stop")


# ----------------------------------------------------------------------------- option validation


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"temperature": 0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"num_beams": 0}, "num_beams"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_new_tokens": 100, "max_length": 100}, "max_length"),
        ({"max_new_tokens": 100, "max_length": 50}, "max_length"),
        ({"temperature": "hot"}, "temperature"),
        ({"num_beam": 3}, "num_beam"),
        ({"stop_strings": [""]}, "stop"),
    ],
)
def test_invalid_options(overrides, name):
    with pytest.raises(model.InvalidGenerationOptions) as exc:
        GenerationOptions.create(**overrides)
    assert name in str(exc.value)


def test_invalid_options_through_the_model(parity_model, contexts):
    with pytest.raises(model.InvalidGenerationOptions, match="top_p"):
        generate_ids(parity_model, [contexts[2]], top_p=1.5)
    with pytest.raises(model.InvalidGenerationOptions, match="bogus"):
        generate_ids(parity_model, [contexts[2]], bogus=1)


def test_defaults_are_the_reference_chat_defaults():
    o = GenerationOptions.create()
    assert (o.max_new_tokens, o.num_beams, o.min_length, o.top_p, o.temperature, o.max_length) == (
        300,
        1,
        1,
        0.9,
        1.0,
        2000,
    )
    assert GenerationOptions.create(top_p=None).top_p == 0.9  # None means "not given"


# ----------------------------------------------------------------------------- RowSampler (fake logits)


def _logits(values: dict[int, float], vocab: int = 16, fill: float = 0.0) -> torch.Tensor:
    out = torch.full((vocab,), fill)
    for i, v in values.items():
        out[i] = v
    return out


def test_min_length_blocks_eos_for_the_first_four_tokens():
    opts = GenerationOptions.create(do_sample=False, min_length=5, repetition_penalty=1.0, max_new_tokens=10)
    sampler = RowSampler(opts, BOS, [EOS], CPU)
    tokens = [sampler.next_token(_logits({EOS: 5.0, 7: 1.0})) for _ in range(5)]
    assert tokens == [7, 7, 7, 7, EOS]  # BOS placeholder + 4 generated = min_length
    assert sampler.finish_reason(None) == "eos"


def test_min_length_one_allows_eos_first():
    opts = GenerationOptions.create(do_sample=False, repetition_penalty=1.0, max_new_tokens=10)
    assert opts.min_length == 1
    sampler = RowSampler(opts, BOS, [EOS], CPU)
    assert sampler.next_token(_logits({EOS: 5.0, 7: 1.0})) == EOS
    assert sampler.finish_reason(None) == "eos"


def test_next_token_leaves_callers_logits_untouched():
    """Regression: with no logits processor, the EOS mask for min_length was written into the caller's tensor."""
    opts = GenerationOptions.create(do_sample=False, min_length=5, repetition_penalty=1.0, max_new_tokens=10)
    sampler = RowSampler(opts, BOS, [EOS], CPU)
    logits = _logits({EOS: 5.0, 7: 1.0})
    before = logits.clone()
    sampler.next_token(logits)
    assert torch.equal(logits, before)


def test_repetition_penalty_counts_bos_placeholder_and_generated():
    opts = GenerationOptions.create(do_sample=False, repetition_penalty=1.3, max_new_tokens=10)
    sampler = RowSampler(opts, BOS, [EOS], CPU)
    # BOS would win without the placeholder in the history (2.0 / 1.3 < 1.8)
    assert sampler.next_token(_logits({BOS: 2.0, 5: 1.8})) == 5
    # the token just generated is penalised (2.0 / 1.3 < 1.7)
    assert sampler.next_token(_logits({5: 2.0, 6: 1.7})) == 6
    # negative scores are multiplied (-0.5 * 1.3 = -0.65 < -0.6)
    assert sampler.next_token(_logits({5: -0.5, 7: -0.6}, fill=-5.0)) == 7
    assert sampler.generated == [5, 6, 7]


def test_repetition_penalty_equals_transformers_processor_on_bos_plus_generated():
    gen = torch.Generator().manual_seed(0)
    opts = GenerationOptions.create(do_sample=False, repetition_penalty=1.2, max_new_tokens=40)
    sampler = RowSampler(opts, BOS, [EOS], CPU)
    processor = RepetitionPenaltyLogitsProcessor(1.2)
    base = torch.randn(32, generator=gen)
    generated: list[int] = []
    for _ in range(30):
        logits = base + 0.05 * torch.randn(32, generator=gen)  # a few tokens keep winning: penalties matter
        expected = processor(torch.tensor([[BOS, *generated]]), logits.clone().unsqueeze(0))
        token = sampler.next_token(logits.clone())
        assert token == int(expected.argmax())
        generated.append(token)
    assert len(set(generated)) > 1
    assert sampler.generated == generated


def test_sampler_finish_reasons():
    opts = GenerationOptions.create(do_sample=False, repetition_penalty=1.0, max_new_tokens=3, stop_token_ids=((4, 5),))
    sampler = RowSampler(opts, BOS, [EOS], CPU)
    sampler.next_token(_logits({4: 1.0}))
    assert sampler.finish_reason(None) is None
    sampler.next_token(_logits({5: 1.0}))
    assert sampler.finish_reason(None) == "stop"
    sampler = RowSampler(opts, BOS, [EOS], CPU)
    for _ in range(3):
        sampler.next_token(_logits({9: 1.0}))
    assert sampler.finish_reason(None) == "length"
    opts = GenerationOptions.create(do_sample=False, repetition_penalty=1.0, stop_strings=("###",))
    sampler = RowSampler(opts, BOS, [EOS], CPU)
    sampler.next_token(_logits({9: 1.0}))
    assert sampler.finish_reason(lambda ids: "ok ##") is None
    assert sampler.finish_reason(lambda ids: "ok ###") == "stop"


def test_seeded_sampler_is_reproducible():
    opts = GenerationOptions.create(do_sample=True, top_p=1.0, top_k=0, seed=5, max_new_tokens=50)
    logits = torch.zeros(64)
    runs = []
    for seed in (5, 5, 6):
        sampler = RowSampler(GenerationOptions.create(**{**opts.__dict__, "seed": seed}), BOS, [EOS], CPU)
        runs.append([sampler.next_token(logits.clone()) for _ in range(20)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_k_limits_candidates():
    opts = GenerationOptions.create(do_sample=True, top_k=2, top_p=1.0, seed=0, repetition_penalty=1.0)
    sampler = RowSampler(opts, BOS, [EOS], CPU)
    logits = _logits({10: 3.0, 11: 2.9}, vocab=64, fill=2.8)
    assert {sampler.next_token(logits.clone()) for _ in range(40)} <= {10, 11}


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("index", [0, 1, 2])
def test_stream_answer_joins_to_decode_answer(parity_model, contexts, index):
    opts = default_options(parity_model, do_sample=False, max_new_tokens=24)
    result = model.GenerationResult()
    chunks = list(stream_answer(parity_model, contexts[index], opts, result))
    (ids,) = generate_ids(parity_model, [contexts[index]], max_new_tokens=24, do_sample=False)
    assert result.token_ids == ids
    assert "".join(chunks) == decode_answer(parity_model, ids)
    assert len([c for c in chunks if c]) > 1  # it really streamed


def test_beam_answer_comes_as_one_delta_equal_to_decode_answer(parity_model, contexts):
    opts = default_options(parity_model, do_sample=False, max_new_tokens=8, num_beams=3)
    result = model.GenerationResult()
    chunks = list(stream_answer(parity_model, contexts[0], opts, result))
    (expected,) = generate(parity_model, [contexts[0]], opts)
    assert result.token_ids == expected.token_ids and result.finish_reason == expected.finish_reason
    assert chunks == [decode_answer(parity_model, expected.token_ids)]


def test_default_options_add_the_variant_stop_strings(parity_model):
    assert default_options(parity_model).stop_strings == parity_model.spec.stop_strings == ("###",)
    assert default_options(parity_model, stop_strings=None).stop_strings == ("###",)  # None: not given
    assert default_options(parity_model, stop_strings=()).stop_strings == ()
    assert default_options(parity_model, max_new_tokens=5).max_new_tokens == 5


def test_forward_runs_the_llm_over_embeddings_or_ids(parity_model):
    m = parity_model
    ids = torch.tensor([m.tokenizer("Hello there").input_ids])
    by_ids = m(input_ids=ids).logits
    by_embeds = m(inputs_embeds=m.embed_ids(ids[0].tolist()).unsqueeze(0)).logits
    with torch.inference_mode():
        direct = m.llm(input_ids=ids).logits
    assert by_ids.shape == (1, ids.shape[1], m.llm.config.vocab_size)
    torch.testing.assert_close(by_ids, direct)
    torch.testing.assert_close(by_embeds, direct)
    assert m(input_ids=ids, logits_to_keep=1).logits.shape[1] == 1
    with pytest.raises(ValueError, match="exactly one"):
        m(input_ids=ids, inputs_embeds=by_embeds)
    with pytest.raises(ValueError, match="exactly one"):
        m()


def test_decode_text_skips_special_tokens(parity_model):
    hello = parity_model.tokenizer("Hello", add_special_tokens=False).input_ids
    assert decode_answer(parity_model, [BOS, *hello, EOS]) == "Hello"


def _byte_decoder(table: dict[int, bytes]):
    return lambda ids: b"".join(table[i] for i in ids).decode("utf-8", errors="replace")


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push(i) for i in ids] + [detok.flush()]


def test_detokenizer_holds_back_partial_stop_string():
    table = {1: b"Hello", 2: b" world", 3: b"#", 4: b"x", 5: b"##"}
    decode = _byte_decoder(table)
    detok = IncrementalDetokenizer(decode, ("###",))
    deltas = _stream(detok, [1, 2, 3, 5, 4])
    assert deltas[:2] == ["Hello", " world"]
    assert deltas[2] == "" and deltas[3] == ""  # '#', '###' never shown
    assert "".join(deltas) == "Hello world"
    # a '#' that does not become '###' is released
    detok = IncrementalDetokenizer(decode, ("###",))
    deltas = _stream(detok, [1, 3, 4])
    assert deltas[1] == "" and deltas[2] == "#x"
    assert "".join(deltas) == "Hello#x"


def test_detokenizer_holds_back_incomplete_utf8():
    table = {1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b"!", 5: b"\xf0\x9f", 6: b"\x98", 7: b"\x80"}
    detok = IncrementalDetokenizer(_byte_decoder(table), ())
    deltas = _stream(detok, [1, 2, 3, 4, 5, 6, 7])
    assert deltas == ["caf", "", "é", "!", "", "", "😀", ""]
    assert "\ufffd" not in "".join(deltas)


def test_detokenizer_strips_leading_whitespace():
    table = {1: b"  ", 2: b" Hi", 3: b" there"}
    detok = IncrementalDetokenizer(_byte_decoder(table), ())
    assert "".join(_stream(detok, [1, 2, 3])) == "Hi there"


@pytest.mark.parametrize(
    "pieces",
    [
        [b"Hello", b" ", b"###", b"Human"],
        [b"Hello", b" ", b"\n"],
        [b"A", b" cat", b" ", b"#", b"##"],
    ],
)
def test_detokenizer_joined_equals_clean_answer(pieces):
    """Regression: trailing whitespace was streamed, then stripped from the final answer only."""
    table = dict(enumerate(pieces))
    decode = _byte_decoder(table)
    detok = IncrementalDetokenizer(decode, ("###",))
    joined = "".join(_stream(detok, list(table)))
    assert joined == clean_answer(decode(list(table)))


def test_stop_sequences_alias_and_batched_context_shape(parity_model, contexts, unbatched):
    ids = unbatched[0]
    stop = ids[3]
    opts = model.GenerationOptions.create(stop_sequences=[[stop], "###"], max_new_tokens=16, do_sample=False)
    assert opts.stop_token_ids == ((stop,),) and opts.stop_strings == ("###",)
    # a [1, L, H] context (what the reference's get_context_emb returns) is accepted as [L, H]
    got = generate_ids(parity_model, [contexts[0].unsqueeze(0)], max_new_tokens=16, do_sample=False,
                                    repetition_penalty=1.0, stop_sequences=[[stop]])  # fmt: skip
    assert got == [ids[: ids.index(stop) + 1]]
    with pytest.raises(ValueError, match="Tensor"):
        generate_ids(parity_model, [contexts[0].unsqueeze(0).repeat(2, 1, 1)], max_new_tokens=2)
