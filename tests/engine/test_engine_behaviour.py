"""Engine behaviour on the tiny demo weights: streaming, cancellation, deadlines, image and prefix caches, beam
search, metrics and shutdown (errors and backpressure: test_engine_errors.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest
from engine_helpers import (
    OTHER,
    PICTURE,
    WAIT,
    alone_ids,
    ask,
    assistant,
    bounded,
    collect,
    context_for,
    endless,
    greedy,
    user,
    wait_until,
)

from model.engine import (
    Engine,
    EngineConfig,
    EngineRequest,
    FinalEvent,
    RequestRejected,
    RequestTooLarge,
    SchedulerConfig,
    TokenEvent,
)
from model.generate import decode_answer, default_options, generate

# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("question", ["What can I cook with this?", "Describe this image in detail."])
def test_streaming_token_events_then_final_and_text_matches(parity_model, question: str) -> None:
    m = parity_model  # random, unsteered: its answers hold byte pieces (the demo weights' no longer do)
    request = ask(m, question, greedy(m, 40))

    async def main():
        async with Engine(m) as eng:
            return await bounded(collect(eng.submit(request)))

    tokens, final = asyncio.run(main())
    assert len(tokens) == final.completion_tokens >= 1 and final.text
    assert any(t.text == "" for t in tokens)  # some deltas were held back (partial characters, whitespace)
    assert "".join(t.text for t in tokens) == final.text == decode_answer(m, final.token_ids)
    assert list(final.token_ids) == alone_ids(m, list(request.turns), list(request.images), request.options)
    assert final.finish_reason in {"length", "eos", "stop"}
    if final.finish_reason == "length":
        assert final.completion_tokens == 40


def test_stream_text_yields_the_answer_in_pieces(m) -> None:
    request = ask(m, "What is this?", greedy(m, 24))

    async def main():
        async with Engine(m) as eng:
            pieces = [piece async for piece in eng.stream_text(request)]
            final = await eng.generate(dataclasses.replace(request, request_id="again"))
            return pieces, final

    pieces, final = asyncio.run(main())
    assert len(pieces) > 1 and all(pieces) and "".join(pieces) == final.text


def test_sampling_with_a_seed_is_reproducible_through_the_engine(m) -> None:
    options = default_options(m, do_sample=True, max_new_tokens=12, seed=1234, temperature=0.9)

    async def main():
        async with Engine(m) as eng:
            return await asyncio.gather(
                *(bounded(eng.generate(ask(m, "Tell me a story.", options, user=f"u{i}"))) for i in range(2))
            )

    a, b = asyncio.run(main())
    assert a.token_ids == b.token_ids and len(a.token_ids) >= 1


# ----------------------------------------------------------------------------- cancellation and deadlines


@pytest.mark.parametrize("how", ["cancel", "aclose", "task"])
def test_cancel_after_two_tokens_frees_the_slot(m, how: str) -> None:
    async def main():
        async with Engine(m, EngineConfig(scheduler=SchedulerConfig(max_batch=1))) as eng:
            stream = eng.submit(ask(m, "Talk forever.", endless(m)))
            seen: list[TokenEvent] = []

            async def consume():
                async for event in stream:
                    seen.append(event)

            if how == "task":
                task = asyncio.create_task(consume())
                assert await wait_until(lambda: len(seen) >= 2)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                seen += [await stream.__anext__() for _ in range(2)]
                if how == "aclose":
                    await stream.aclose()
                else:
                    stream.cancel()
            assert await wait_until(lambda: eng.runner.batch_size == 0 and not eng.scheduler.running)
            assert not eng._seqs and not eng._aborted
            after = await bounded(eng.generate(ask(m, "Short one.", greedy(m, 4, min_length=5))))
            return seen, after, eng.snapshot()

    seen, after, snap = asyncio.run(main())
    assert [e.index for e in seen[:2]] == [0, 1]
    assert all(isinstance(e, TokenEvent) for e in seen)
    assert len(seen) < 1500
    assert after.finish_reason == "length" and after.completion_tokens == 4
    assert snap["finish_reasons"].get("aborted") == 1


def test_cancelling_a_queued_request_means_it_never_runs(m) -> None:
    async def main():
        async with Engine(m, EngineConfig(scheduler=SchedulerConfig(max_batch=1))) as eng:
            running = eng.submit(ask(m, "Long.", endless(m), user="a"))
            await running.__anext__()
            queued = eng.submit(ask(m, "Queued.", endless(m), user="b"))
            assert eng.scheduler.queue_depth == 1
            queued.cancel()
            assert await wait_until(lambda: eng.scheduler.queue_depth == 0 and queued.request_id not in eng._seqs)
            running.cancel()
            assert await wait_until(lambda: eng.runner.batch_size == 0)
            final = await bounded(eng.generate(ask(m, "Next.", greedy(m, 3, min_length=4), user="c")))
            leftover = [event async for event in queued]  # a cancelled stream is over
            return final, eng.metrics.submitted, leftover

    final, submitted, leftover = asyncio.run(main())
    assert final.completion_tokens == 3 and submitted == 3
    assert leftover == []


def test_deadline_ends_a_long_answer(m) -> None:
    async def main():
        async with Engine(m) as eng:
            return await bounded(collect(eng.submit(ask(m, "Go on.", endless(m), deadline_s=0.05))))

    tokens, final = asyncio.run(main())
    assert final.finish_reason == "deadline"
    assert 1 <= final.completion_tokens == len(tokens) < 1500
    assert final.total_s >= 0.05


def test_deadline_also_bounds_the_time_spent_queued(m) -> None:
    """``deadline_s`` "bounds the whole request": a request stuck in the queue must end at its deadline too."""

    async def main():
        async with Engine(m, EngineConfig(scheduler=SchedulerConfig(max_batch=1))) as eng:
            hog = eng.submit(ask(m, "Long.", endless(m, 8000), user="a"))
            await hog.__anext__()
            late = eng.submit(ask(m, "In a hurry.", greedy(m, 4), user="b", deadline_s=0.1))
            try:
                final = await asyncio.wait_for(late.final(), 1.5)
            except TimeoutError:
                final = None
            hog_still_running = eng.runner.batch_size == 1 and hog.request_id in eng.scheduler.running
            hog.cancel()
            late.cancel()
            return final, hog_still_running

    final, hog_still_running = asyncio.run(main())
    assert hog_still_running  # the queued request really was waiting behind it
    assert final is not None, "a queued request outlived its deadline (only running rows are checked)"
    assert final.finish_reason == "deadline"


# ----------------------------------------------------------------------------- caches


def test_same_image_is_encoded_once(m) -> None:
    async def main():
        async with Engine(m) as eng:
            first = await bounded(eng.generate(ask(m, "What is this?", greedy(m, 5))))
            second = await bounded(eng.generate(ask(m, "And the colours?", greedy(m, 5))))
            third = await bounded(eng.generate(ask(m, "What is this?", greedy(m, 5), image=OTHER)))
            return first, second, third, eng.runner.images, eng.snapshot()

    first, second, third, images, snap = asyncio.run(main())
    assert images.misses == 2 and images.hits == 1 and len(images) == 2
    assert snap["image_cache_hit_rate"] == pytest.approx(1 / 3)
    assert list(first.token_ids) == alone_ids(m, [user("What is this?")], [PICTURE], greedy(m, 5))
    assert list(second.token_ids) == alone_ids(m, [user("And the colours?")], [PICTURE], greedy(m, 5))
    assert list(third.token_ids) == alone_ids(m, [user("What is this?")], [OTHER], greedy(m, 5))


def test_concurrent_requests_with_one_image_encode_it_once(m) -> None:
    async def main():
        async with Engine(m) as eng:
            await asyncio.gather(
                *(bounded(eng.generate(ask(m, f"Q{i}", greedy(m, 4), user=f"u{i}"))) for i in range(3))
            )
            return eng.runner.images.misses, eng.runner.images.hits

    assert asyncio.run(main()) == (1, 2)


def test_prefix_store_stays_within_the_budget_and_evicted_follow_ups_fall_back(m) -> None:
    options = greedy(m, 6, min_length=7, stop_strings=())
    first_turn = [user("What can I cook with this?")]
    prompt_tokens = context_for(m, first_turn, [PICTURE]).shape[0]
    budget = int(2.5 * (prompt_tokens + 6))  # room for two cached turns, not three
    config = EngineConfig(scheduler=SchedulerConfig(kv_budget_tokens=budget))
    # c0 and c3 are the same conversation under two ids: c0 gets evicted, c3 stays cached.
    questions = {"c0": first_turn[0]["text"], "c1": "Is it tasty?", "c2": "Describe it.", "c3": first_turn[0]["text"]}

    async def main():
        async with Engine(m, config) as eng:
            answers = {}
            for cid, question in questions.items():
                answers[cid] = await bounded(eng.generate(ask(m, question, options, conversation_id=cid)))
                stored = eng.runner.prefixes._entries
                assert sum(e.tokens for e in stored.values()) <= budget
                assert await wait_until(lambda stored=stored: set(eng.scheduler.prefixes) == set(stored))
                assert eng.scheduler.cached_tokens <= budget
            kept = set(eng.runner.prefixes._entries)
            follow = {}
            for cid in ("c3", "c0"):
                turns = [*first_turn, assistant(answers[cid].text), user("Anything else?", image=False)]
                follow[cid] = await bounded(
                    eng.generate(EngineRequest(turns=turns, images=[PICTURE], options=options, conversation_id=cid))
                )
            return answers, kept, follow, eng.snapshot()

    answers, kept, follow, snap = asyncio.run(main())
    assert answers["c0"].token_ids == answers["c3"].token_ids
    assert kept == {"c2", "c3"}
    # the first prompt, less its trailing "Assistant: " space token that the answer's first word absorbs
    assert follow["c3"].reused_prefix_tokens >= prompt_tokens - 1
    assert follow["c0"].reused_prefix_tokens == 0  # evicted: full prefill
    assert follow["c0"].token_ids == follow["c3"].token_ids
    assert follow["c0"].prompt_tokens == follow["c3"].prompt_tokens
    turns = [*first_turn, assistant(answers["c0"].text), user("Anything else?", image=False)]
    assert list(follow["c0"].token_ids) == alone_ids(m, turns, [PICTURE], options)
    assert snap["cached_prefix_tokens"] <= budget


def test_request_too_large_for_the_budget_is_rejected_at_submit(m) -> None:
    config = EngineConfig(scheduler=SchedulerConfig(kv_budget_tokens=50))

    async def main():
        async with Engine(m, config) as eng:
            with pytest.raises(RequestTooLarge) as info:
                eng.submit(ask(m, "Too big.", greedy(m, 20)))
            return eng.metrics.submitted, info.value

    submitted, error = asyncio.run(main())
    assert submitted == 0
    assert isinstance(error, RequestRejected) and error.reason == "too_large" and "KV budget of 50" in error.detail


# ----------------------------------------------------------------------------- beam search


def test_beam_search_through_the_engine_equals_model_generate(m) -> None:
    options = default_options(m, do_sample=False, num_beams=3, max_new_tokens=8, repetition_penalty=1.0)
    request = ask(m, "Describe this image.", options)
    expected = generate(m, [context_for(m, list(request.turns), [PICTURE])], options)[0]

    async def main():
        async with Engine(m) as eng:
            return await bounded(collect(eng.submit(request)))

    tokens, final = asyncio.run(main())
    assert list(final.token_ids) == expected.token_ids
    assert final.finish_reason == expected.finish_reason
    assert len(tokens) == len(expected.token_ids)
    assert final.text == decode_answer(m, expected.token_ids)


# ----------------------------------------------------------------------------- metrics and shutdown


def test_metrics_snapshot_has_sane_values(m) -> None:
    async def main():
        async with Engine(m) as eng:
            idle = eng.snapshot()
            stream = eng.submit(ask(m, "Long.", endless(m, 400)))
            await stream.__anext__()
            busy = eng.snapshot()
            stream.cancel()
            await asyncio.gather(
                *(
                    bounded(eng.generate(ask(m, f"Q{i}", greedy(m, 6, min_length=7, stop_strings=()), user=f"u{i}")))
                    for i in range(3)
                )
            )
            await bounded(
                eng.generate(
                    ask(m, "Q0", greedy(m, 6, min_length=7, stop_strings=()), image=OTHER, conversation_id="k")
                )
            )
            assert await wait_until(lambda: eng.runner.batch_size == 0)
            return idle, busy, eng.snapshot()

    idle, busy, snap = asyncio.run(main())
    keys = {"queue_depth", "batch_size", "tokens_per_s", "ttft_first_p50_s", "image_cache_hit_rate"}
    assert keys | {"prefix_cache_hit_rate"} <= set(snap)
    assert idle["queue_depth"] == 0 and idle["batch_size"] == 0 and idle["ttft_first_p50_s"] is None
    assert idle["tokens_per_s"] == 0.0
    assert busy["batch_size"] == 1 and busy["queue_depth"] == 0
    assert snap["queue_depth"] == 0 and snap["batch_size"] == 0
    assert snap["tokens_per_s"] > 0
    assert 0 < snap["ttft_first_p50_s"] < WAIT
    assert snap["image_cache_hit_rate"] == pytest.approx(3 / 5)  # 5 lookups: PICTURE ×4, OTHER ×1
    assert 0.0 <= snap["prefix_cache_hit_rate"] <= 1.0
    assert snap["submitted"] == snap["finished"] == 5
    assert snap["finish_reasons"] == {"aborted": 1, "length": 4}
    assert snap["generated_tokens"] >= 4 * 6 + 1
    assert snap["mean_batch_size"] >= 1.0


def test_stopping_the_engine_aborts_running_and_queued_requests(m) -> None:
    async def main():
        eng = Engine(m, EngineConfig(scheduler=SchedulerConfig(max_batch=1))).start()
        try:
            running = eng.submit(ask(m, "Long.", endless(m), user="a"))
            first = await running.__anext__()
            queued = eng.submit(ask(m, "Waiting.", endless(m), user="b"))
            await asyncio.to_thread(eng.stop)
            rest_running = await bounded(collect(running, [first]))
            rest_queued = await bounded(collect(queued))
            return rest_running, rest_queued, eng
        finally:
            eng.stop()

    (_, running_final), (queued_tokens, queued_final), eng = asyncio.run(main())
    assert running_final.finish_reason == "aborted" and running_final.completion_tokens >= 1
    assert queued_final.finish_reason == "aborted" and queued_final.completion_tokens == 0 and not queued_tokens
    assert eng._thread is None


def test_the_final_event_is_last_and_unique(m) -> None:
    async def main():
        async with Engine(m) as eng:
            stream = eng.submit(ask(m, "Q.", greedy(m, 3, min_length=4)))
            events = [event async for event in stream]
            more = [event async for event in stream]
            return events, more

    events, more = asyncio.run(main())
    assert isinstance(events[-1], FinalEvent) and more == []
    assert sum(isinstance(e, FinalEvent) for e in events) == 1


# ----------------------------------------------------------------------------- prefix accounting


@pytest.mark.parametrize("follow_up", ["beam", "broken image"])
def test_prefix_accounting_stays_in_sync_when_a_follow_up_never_prefills(m, follow_up: str) -> None:
    """The scheduler stops counting a conversation's cached prefix once its follow-up is admitted; the runner
    must then not keep that KV either, or it lives on outside the KV budget until the conversation returns."""
    options = greedy(m, 4, min_length=5, stop_strings=())
    if follow_up == "beam":
        second_options, second_images = dataclasses.replace(options, num_beams=2), [PICTURE]
    else:
        second_options, second_images = options, [b"not an image"]

    async def main():
        async with Engine(m) as eng:
            first = await bounded(eng.generate(ask(m, "What is this?", options, conversation_id="c")))
            assert await wait_until(lambda: "c" in eng.scheduler.prefixes and "c" in eng.runner.prefixes)
            turns = [user("What is this?"), assistant(first.text), user("Sure?", image=False)]
            second = EngineRequest(turns=turns, images=second_images, options=second_options, conversation_id="c")
            with contextlib.suppress(RequestRejected):
                await bounded(eng.generate(second))
            assert await wait_until(lambda: not eng.scheduler.running)
            return set(eng.scheduler.prefixes), set(eng.runner.prefixes._entries)

    counted, held = asyncio.run(main())
    assert held == counted, f"the runner holds KV for {held - counted} that the scheduler no longer counts"
