"""The engine gives the reference's greedy ids, alone, in a busy continuous batch and with prefix reuse.

Expected ids come from the unmodified reference code (tests/fixtures/reference_extra and the
public parity fixture); the model is ``parity_model`` (Vicuna v0 layout, fp32, CPU).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import alone_ids, assistant, collect, context_for, items_for, user, wait_until
from transformers.cache_utils import DynamicCache

from model.engine import Engine, EngineConfig, EngineRequest, FinalEvent, TokenEvent
from model.engine.caches import common_prefix
from model.generate import decode_answer, default_options

FIX = Path(__file__).resolve().parents[1] / "fixtures"
PARITY = FIX / "parity"
EXTRA = FIX / "reference_extra"
CASES = json.loads((EXTRA / "expected_extra.json").read_text(encoding="utf-8"))
PUBLIC = json.loads((PARITY / "expected" / "expected.json").read_text(encoding="utf-8"))
SHAPES = (PARITY / "images" / "shapes_64x64.png").read_bytes()
STRIPES = (PARITY / "images" / "stripes_80x48.png").read_bytes()
IMAGES = {"shapes_64x64.png": SHAPES, "stripes_80x48.png": STRIPES}

SINGLE = CASES["vicuna0_single"]
TWO_TURNS = CASES["vicuna0_two_turns_two_images"]
BATCH2 = CASES["vicuna0_batch2_generate"]


@pytest.fixture(scope="module")
def m(parity_model):
    return parity_model


def greedy(m, n: int, rp: float = 1.0):
    return default_options(m, do_sample=False, max_new_tokens=n, repetition_penalty=rp)


def two_turn_requests(conversation_id: str | None, n: int = 8) -> tuple[EngineRequest, EngineRequest]:
    first, second = TWO_TURNS["turns"]
    turn1 = [user(first["question"])]
    turn2 = [*turn1, assistant(first["assistant_answer_fixed"]), user(second["question"])]
    images = [IMAGES[name] for name in TWO_TURNS["images"]]
    return (
        EngineRequest(turns=turn1, images=images[:1], conversation_id=conversation_id, user="t"),
        EngineRequest(turns=turn2, images=images, conversation_id=conversation_id, user="t"),
    )


# ----------------------------------------------------------------------------- one request


def test_single_request_gives_the_reference_greedy_ids(m) -> None:
    turns = [user(SINGLE["question"])]
    assert m.build_prompt(turns) == SINGLE["prompt"]

    async def main():
        async with Engine(m) as eng:
            stream = eng.submit(EngineRequest(turns=turns, images=[SHAPES], options=greedy(m, 8)))
            return await collect(stream)

    tokens, final = asyncio.run(main())
    assert list(final.token_ids) == SINGLE["greedy_ids_8_rp1.0"] == PUBLIC["vicuna0_single"]["greedy_ids"]
    assert final.finish_reason == "length"
    assert final.text == decode_answer(m, final.token_ids) == SINGLE["decoded_text_chat_answer_8_rp1.0"]
    assert final.prompt_tokens == SINGLE["context_len"]
    assert final.completion_tokens == 8 and len(tokens) == 8
    assert final.reused_prefix_tokens == 0
    assert final.ttft_s is not None and 0 < final.ttft_s <= final.total_s


def test_single_request_with_a_ready_prompt_gives_the_reference_ids(m) -> None:
    async def main():
        async with Engine(m) as eng:
            return await eng.generate(EngineRequest(prompt=SINGLE["prompt"], images=[SHAPES], options=greedy(m, 8)))

    assert list(asyncio.run(main()).token_ids) == SINGLE["greedy_ids_8_rp1.0"]


def test_one_token_answer_finishes_at_prefill_and_keeps_its_prefix(m) -> None:
    request = EngineRequest(
        turns=[user(SINGLE["question"])], images=[SHAPES], options=greedy(m, 1), conversation_id="one"
    )

    async def main():
        async with Engine(m) as eng:
            final = await eng.generate(request)
            return final, eng.runner.prefixes._entries["one"], eng.runner.batch_size

    final, entry, rows = asyncio.run(main())
    assert list(final.token_ids) == SINGLE["greedy_ids_8_rp1.0"][:1]
    assert final.finish_reason == "length" and rows == 0
    assert entry.tokens == SINGLE["context_len"]  # the prompt only: the one sampled token was never fed


def test_32_token_runs_with_and_without_repetition_penalty(m) -> None:
    turns = [user(SINGLE["question"])]

    async def main():
        async with Engine(m) as eng:
            streams = [
                eng.submit(EngineRequest(turns=turns, images=[SHAPES], options=greedy(m, 32, rp), user=f"u{rp}"))
                for rp in (1.0, 1.05)
            ]
            return await asyncio.gather(*(collect(s) for s in streams)), max(eng.metrics.batch_sizes)

    ((_, plain), (_, penalised)), widest = asyncio.run(main())
    assert list(plain.token_ids) == SINGLE["greedy_ids_32_rp1.0"]
    assert list(penalised.token_ids) == SINGLE["greedy_ids_32_rp1.05"]
    assert plain.token_ids[:22] == penalised.token_ids[:22] and plain.token_ids[22] != penalised.token_ids[22]
    assert widest == 2  # the two ran in one batch


# ----------------------------------------------------------------------------- busy batch


def test_busy_continuous_batch_keeps_every_row_equal_to_its_lone_run(m) -> None:
    texts = BATCH2["texts"]
    assert [m.build_prompt([user(q)]) for q in ("What can I cook with this?", "Describe this image.")] == texts

    def req(turns, images, n, rp=1.0, name=""):
        return EngineRequest(turns=turns, images=images, options=greedy(m, n, rp), user=name, request_id=name)

    leader = req([user("Describe this image in detail.")], [STRIPES], 32, name="leader")
    ref0 = req([user("What can I cook with this?")], [SHAPES], 8, name="ref0")
    ref1 = req([user("Describe this image.")], [STRIPES], 8, name="ref1")
    wave1 = [
        ref0,
        ref1,
        req([user("What colour is the circle?")], [SHAPES], 3, name="short"),
        req([user("Is it day or night?")], [STRIPES], 16, 1.05, name="penalised"),
    ]
    wave2 = [
        req([user("Tell me a joke.", image=False)], [], 12, name="text-only"),
        req(
            [user("Describe this image."), assistant("Stripes."), user("And this one?")],
            [STRIPES, SHAPES],
            6,
            name="two-images",
        ),
    ]

    async def main():
        async with Engine(m) as eng:
            lead = eng.submit(leader)
            lead_events = [await lead.__anext__() for _ in range(3)]  # the leader is mid-decode
            tasks = {"leader": asyncio.create_task(collect(lead, lead_events))}
            streams1 = {r.request_id: eng.submit(r) for r in wave1}
            ref0_events = [await streams1["ref0"].__anext__() for _ in range(2)]
            for r in wave2:  # join while the first wave decodes
                tasks[r.request_id] = asyncio.create_task(collect(eng.submit(r)))
            tasks["ref0"] = asyncio.create_task(collect(streams1.pop("ref0"), ref0_events))
            tasks |= {k: asyncio.create_task(collect(s)) for k, s in streams1.items()}
            done = dict(zip(tasks, await asyncio.gather(*tasks.values()), strict=True))
            return done, list(eng.metrics.batch_sizes)

    done, batch_sizes = asyncio.run(main())
    finals: dict[str, FinalEvent] = {k: final for k, (_, final) in done.items()}
    assert [list(finals["ref0"].token_ids), list(finals["ref1"].token_ids)] == BATCH2["batched_greedy_ids"]
    for r in [leader, *wave1, *wave2]:
        expected = alone_ids(m, list(r.turns), list(r.images), r.options)
        assert list(finals[r.request_id].token_ids) == expected, r.request_id
        assert finals[r.request_id].completion_tokens == len(expected)
    assert finals["short"].completion_tokens == 3 and finals["leader"].completion_tokens == 32
    assert max(batch_sizes) >= 5  # really batched
    assert len(set(batch_sizes)) >= 3  # rows joined and left at different steps


# ----------------------------------------------------------------------------- conversation prefix reuse


def test_two_turn_follow_up_reuses_the_prefix_and_gives_the_reference_ids(m) -> None:
    turn1, turn2 = two_turn_requests("conv-1")
    turn1.options = greedy(m, 8)
    turn2.options = greedy(m, 8)

    async def main():
        async with Engine(m) as eng:
            first = await eng.generate(turn1)
            assert "conv-1" in eng.runner.prefixes  # kept before the final event is sent
            assert await wait_until(lambda: "conv-1" in eng.scheduler.prefixes)
            second = await eng.generate(turn2)
            return first, second, eng.snapshot()

    first, second, snap = asyncio.run(main())
    assert first.reused_prefix_tokens == 0
    assert second.reused_prefix_tokens > 0
    shared = common_prefix(
        items_for(m, list(turn1.turns), list(turn1.images)), items_for(m, list(turn2.turns), list(turn2.images))
    )
    assert second.reused_prefix_tokens >= shared > 59 + 8  # at least the first segment and the first image
    assert second.prompt_tokens == TWO_TURNS["context_len"]
    assert list(second.token_ids) == TWO_TURNS["greedy_ids_8_rp1.0"]
    assert snap["reused_prefix_tokens"] == second.reused_prefix_tokens
    assert snap["prefix_cache_hit_rate"] == pytest.approx(0.5)  # turn 1 missed, turn 2 hit
    assert snap["ttft_follow_up_p50_s"] is not None


def test_stored_prefix_kv_gives_the_same_logits_as_a_full_prefill(m) -> None:
    turn1, turn2 = two_turn_requests("conv-kv")
    turn1.options = greedy(m, 5)

    async def main():
        async with Engine(m) as eng:
            first = await eng.generate(turn1)
            return first, eng.runner.prefixes._entries["conv-kv"]

    first, entry = asyncio.run(main())
    turn1_items = items_for(m, list(turn1.turns), list(turn1.images))
    assert entry.items == turn1_items + list(first.token_ids[:-1])  # the last sampled token was never fed
    heads, head_dim = entry.kv[0][0].shape[1], entry.kv[0][0].shape[3]
    for k, v in entry.kv:
        assert k.shape == v.shape == (1, heads, entry.tokens, head_dim)

    images = list(turn2.images)
    ctx = context_for(m, list(turn2.turns), images)
    reused = min(common_prefix(entry.items, items_for(m, list(turn2.turns), images)), ctx.shape[0] - 1)
    assert reused >= len(turn1_items) - 2
    with torch.inference_mode():
        full = m.llm(inputs_embeds=ctx[None]).logits[0, -1]
        cache = DynamicCache(ddp_cache_data=[(k[:, :, :reused], v[:, :, :reused]) for k, v in entry.kv])
        positions = torch.arange(reused, ctx.shape[0]).unsqueeze(0)
        out = m.llm(inputs_embeds=ctx[None, reused:], position_ids=positions, cache=cache, use_cache=True)
    torch.testing.assert_close(out.logits[0, -1], full, atol=1e-4, rtol=0)
    reference = torch.from_numpy(np.load(EXTRA / "vicuna0_two_turns_two_images__last_logits.npy"))
    torch.testing.assert_close(out.logits[0, -1], reference, atol=1e-4, rtol=0)


def test_follow_ups_with_and_without_prefix_reuse_give_the_same_ids(m) -> None:
    async def run(config: EngineConfig, conversation_id: str):
        turn1, turn2 = two_turn_requests(conversation_id)
        turn1.options = greedy(m, 8)
        turn2.options = greedy(m, 32)
        async with Engine(m, config) as eng:
            first = await eng.generate(turn1)
            # a realistic third turn: the answer the engine actually gave, then another question
            turn3 = EngineRequest(
                turns=[*turn1.turns, assistant(first.text), user("What is in it?", image=False)],
                images=turn1.images,
                options=greedy(m, 16),
                conversation_id=conversation_id,
                user="t",
            )
            third = await eng.generate(turn3)
            second = await eng.generate(turn2)
            return third, second, turn3

    reuse_third, reuse_second, turn3 = asyncio.run(run(EngineConfig(), "conv-a"))
    full_third, full_second, _ = asyncio.run(run(EngineConfig(prefix_reuse=False), "conv-b"))
    assert reuse_second.reused_prefix_tokens > 0 and reuse_third.reused_prefix_tokens > 0
    assert full_second.reused_prefix_tokens == full_third.reused_prefix_tokens == 0
    assert reuse_second.token_ids == full_second.token_ids
    assert list(reuse_second.token_ids) == TWO_TURNS["greedy_ids_32_rp1.0"]
    assert reuse_third.token_ids == full_third.token_ids
    assert list(reuse_third.token_ids) == alone_ids(m, list(turn3.turns), list(turn3.images), turn3.options)


def test_prefix_reuse_off_keeps_no_prefixes(m) -> None:
    turn1, _ = two_turn_requests("conv-off")
    turn1.options = greedy(m, 3)

    async def main():
        async with Engine(m, EngineConfig(prefix_reuse=False)) as eng:
            await eng.generate(turn1)
            return len(eng.runner.prefixes), dict(eng.scheduler.prefixes)

    assert asyncio.run(main()) == (0, {})


def test_token_events_stream_before_the_final_event(m) -> None:
    async def main():
        async with Engine(m) as eng:
            stream = eng.submit(EngineRequest(turns=[user(SINGLE["question"])], images=[SHAPES], options=greedy(m, 8)))
            first = await stream.__anext__()
            assert isinstance(first, TokenEvent) and first.index == 0
            return first, await stream.final()

    first, final = asyncio.run(main())
    assert first.token_id == SINGLE["greedy_ids_8_rp1.0"][0]
    assert final.token_ids[0] == first.token_id


def test_context_cut_from_the_left_by_max_length_matches_model_generate(m) -> None:
    options = default_options(m, do_sample=False, max_new_tokens=8, repetition_penalty=1.0, max_length=60)
    turns = [user(SINGLE["question"])]

    async def main():
        async with Engine(m) as eng:
            return await eng.generate(EngineRequest(turns=turns, images=[SHAPES], options=options))

    final = asyncio.run(main())
    assert final.prompt_tokens == 60 - 8  # 81 context tokens, the first 29 cut (the reference rule)
    expected = alone_ids(m, turns, [SHAPES], options)
    assert list(final.token_ids) == expected
    assert expected != SINGLE["greedy_ids_8_rp1.0"]  # the cut really changed the answer


def test_llama2_layout_through_the_engine_gives_the_reference_ids(parity_llama2_model) -> None:
    case = CASES["llama2_single"]
    lm = parity_llama2_model
    options = default_options(lm, do_sample=False, max_new_tokens=8, repetition_penalty=1.05)

    async def main():
        async with Engine(lm) as eng:
            return await eng.generate(
                EngineRequest(turns=[user(case["question"])], images=[IMAGES[case["image"]]], options=options)
            )

    final = asyncio.run(main())
    assert list(final.token_ids) == case["greedy_ids_8_rp1.05"]
    assert final.prompt_tokens == case["context_len"]
