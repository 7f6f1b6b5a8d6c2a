"""The sequences admitted in one step are prefilled in one padded forward, with each lone run's greedy ids.

Mixed prompt lengths, with and without pictures, new threads beside follow-ups that reuse their cached
prefix: every row still equals the same request run on its own (``model.generate``).  The requests are
submitted while the test holds the engine's lock, so the worker admits them all in the same step.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import alone_ids, assistant, collect, user, wait_until

from model.engine import Engine, EngineConfig, EngineRequest, SchedulerConfig
from model.generate import default_options

PARITY = Path(__file__).resolve().parents[1] / "fixtures" / "parity" / "images"
SHAPES = (PARITY / "shapes_64x64.png").read_bytes()
STRIPES = (PARITY / "stripes_80x48.png").read_bytes()
CONFIG = EngineConfig(scheduler=SchedulerConfig(max_prefills_per_step=8, max_running_per_user=8))


@pytest.fixture(scope="module")
def m(parity_model):
    return parity_model


def greedy(m, n: int, rp: float = 1.0):
    return default_options(m, do_sample=False, max_new_tokens=n, repetition_penalty=rp)


def count_prefills(m, monkeypatch) -> list[int]:
    """Batch sizes of the prefill forwards (the runner asks for the last position's logits only)."""
    sizes: list[int] = []
    real = m.forward

    def forward(inputs_embeds=None, **kwargs: Any):
        if kwargs.get("logits_to_keep") == 1:
            sizes.append(int(inputs_embeds.shape[0]))
        return real(inputs_embeds, **kwargs)

    monkeypatch.setattr(m, "forward", forward)
    return sizes


async def wave(eng: Engine, requests: list[EngineRequest]) -> dict[str, Any]:
    """Submit ``requests`` so that one step admits them all; their final events by request id."""
    with eng._lock:  # a re-entrant lock: submit() takes it too, the worker waits
        streams = [eng.submit(r) for r in requests]
    results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 60)
    return {r.request_id: final for r, (_, final) in zip(requests, results, strict=True)}


def test_one_step_prefills_mixed_new_and_follow_up_rows_together_with_lone_ids(m, monkeypatch) -> None:
    def req(turns, images, n, name, conversation=None, rp=1.0):
        return EngineRequest(turns=turns, images=images, options=greedy(m, n, rp), conversation_id=conversation,
                             user=name, request_id=name)  # fmt: skip

    firsts = [
        req([user("Describe this image.")], [STRIPES], 6, "a1", "a"),
        req([user("What can I cook with this?")], [SHAPES], 9, "b1", "b"),
    ]
    history_a = [user("Describe this image."), assistant("Stripes."), user("And the colours?", image=False)]
    history_b = [user("What can I cook with this?"), assistant("Soup, maybe."), user("Anything else?", image=False),
                 assistant("Bread."), user("And for dessert, with this one?")]  # fmt: skip
    follow_ups = [
        req(history_a, [STRIPES], 7, "a2", "a"),
        req(history_b, [SHAPES, STRIPES], 8, "b2", "b"),
        req([user("Tell me a joke.", image=False)], [], 12, "text-only", rp=1.05),
        req([user("Is it day or night in this long picture of many stripes?")], [STRIPES], 5, "new"),
    ]

    async def main():
        async with Engine(m, CONFIG) as eng:
            first = await wave(eng, firsts)
            assert await wait_until(lambda: {"a", "b"} <= set(eng.scheduler.prefixes))
            sizes = count_prefills(m, monkeypatch)
            second = await wave(eng, follow_ups)
            return first | second, sizes

    finals, sizes = asyncio.run(main())
    assert sizes == [4]  # the four admitted rows: one forward
    for r in [*firsts, *follow_ups]:
        assert list(finals[r.request_id].token_ids) == alone_ids(m, list(r.turns), list(r.images), r.options), r
    assert finals["a2"].reused_prefix_tokens > 0 and finals["b2"].reused_prefix_tokens > 0
    assert finals["a2"].reused_prefix_tokens != finals["b2"].reused_prefix_tokens  # different padding per row
    assert finals["text-only"].reused_prefix_tokens == finals["new"].reused_prefix_tokens == 0


def test_a_failing_batched_prefill_retries_each_row_alone(m, monkeypatch) -> None:
    requests = [
        EngineRequest(turns=[user(q)], images=[SHAPES], options=greedy(m, 4), user=q, request_id=q)
        for q in ("One?", "Second, a longer question?", "Third?")
    ]
    sizes: list[int] = []
    real = m.forward

    def forward(inputs_embeds=None, **kwargs: Any):
        if kwargs.get("logits_to_keep") == 1:
            sizes.append(int(inputs_embeds.shape[0]))
            if inputs_embeds.shape[0] > 1:
                raise RuntimeError("out of memory (simulated)")
        return real(inputs_embeds, **kwargs)

    async def main():
        async with Engine(m, CONFIG) as eng:
            monkeypatch.setattr(m, "forward", forward)
            return await wave(eng, requests)

    finals = asyncio.run(main())
    assert sizes == [3, 1, 1, 1]
    for r in requests:
        assert list(finals[r.request_id].token_ids) == alone_ids(m, list(r.turns), list(r.images), r.options)
