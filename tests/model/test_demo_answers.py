"""Demo weights answer in readable nonsense: no byte pieces (U+FFFD on screen), no random ``###`` stop, not 1 token.

The demo LLM is random, but half its vocabulary is SentencePiece byte fallback and it holds ``#`` pieces; a
newcomer's first answers were strings of U+FFFD, cut by a random ``###`` after a few dozen tokens.
"""

from __future__ import annotations

import statistics

import pytest
import sentencepiece as spm
import torch

from model.generate import default_options, generate
from model.image_processing import builtin_test_image

VARIANTS = ("vicuna0", "llama2", "minigptv2")


def _avoided(weights) -> list[int]:
    sp = spm.SentencePieceProcessor(model_file=str(weights.llm / "tokenizer.model"))
    return [i for i in range(sp.get_piece_size()) if sp.is_byte(i) or "#" in sp.id_to_piece(i)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_byte_and_hash_pieces_score_far_below_every_other_piece(demo_dir, demo_models, variant) -> None:
    m, avoided = demo_models[variant], _avoided(demo_dir[variant])
    assert len(avoided) >= 256  # the byte pieces at least
    context = m.context_embeddings(m.build_prompt([{"role": "user", "text": "Describe it.", "image": True}]),
                                   m.encode_pil([builtin_test_image(224)]))  # fmt: skip
    ids = torch.randint(3, m.llm.config.vocab_size, (60,), generator=torch.Generator().manual_seed(0))
    embeds = torch.cat([context, m.llm.get_input_embeddings()(ids)])  # a picture prompt, then random text
    with torch.inference_mode():  # the positions a next token is sampled at: the prompt's last, the text after it
        logits = m(inputs_embeds=embeds.unsqueeze(0)).logits[0, context.shape[0] - 1 :]
    allowed = torch.ones(logits.shape[-1], dtype=torch.bool)
    allowed[avoided] = False
    gap = logits[:, allowed].max(-1).values - logits[:, ~allowed].max(-1).values
    assert bool((gap > 10).all()), gap.min()


def test_sampled_demo_answers_are_readable_and_not_cut_short(demo_models) -> None:
    m = demo_models["vicuna0"]
    options = default_options(m, do_sample=True, max_new_tokens=300, seed=0)
    prompts = ["Describe it.", "What could I cook with this?", "Write a poem about it.", "Is it day or night?"]
    contexts = [m.context_embeddings(m.build_prompt([{"role": "user", "text": p, "image": True}]),
                                     m.encode_pil([builtin_test_image(224)])) for p in prompts * 2]  # fmt: skip
    results = generate(m, contexts, options)
    texts = [m.decode_text(r.token_ids) for r in results]
    assert all("\ufffd" not in t and "#" not in t for t in texts), texts
    assert statistics.median(len(r.token_ids) for r in results) >= 20
