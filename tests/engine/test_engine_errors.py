"""Engine errors on the tiny demo weights: bad options and pictures, template refusals, crashing steps and
failed prefills (each fails alone and the engine goes on), id clashes and a full queue."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from engine_helpers import (
    OTHER,
    PICTURE,
    alone_ids,
    ask,
    assistant,
    bounded,
    collect,
    endless,
    greedy,
    user,
    wait_until,
)

import model
from model.engine import (
    Busy,
    Engine,
    EngineConfig,
    EngineError,
    EngineRequest,
    RequestFailed,
    RequestRejected,
    SchedulerConfig,
)

# ----------------------------------------------------------------------------- errors


def test_invalid_options_raise_at_submit_and_the_engine_keeps_serving(m) -> None:
    bad = dataclasses.replace(greedy(m, 4), temperature=0.0)
    good = ask(m, "Fine question.", greedy(m, 10))

    async def main():
        async with Engine(m) as eng:
            stream = eng.submit(good)
            with pytest.raises(model.InvalidGenerationOptions, match="temperature") as info:
                eng.submit(ask(m, "Bad question.", bad))
            with pytest.raises(model.InvalidGenerationOptions, match="max_length"):
                eng.submit(ask(m, "Bad question.", dataclasses.replace(greedy(m, 4), max_length=4)))
            return await bounded(collect(stream)), eng.metrics.submitted, info.value

    (_, final), submitted, error = asyncio.run(main())
    # bad options are a request the engine rejects, in the contract's terms
    assert isinstance(error, RequestRejected) and error.reason == "invalid" and "temperature" in error.detail
    assert list(final.token_ids) == alone_ids(m, list(good.turns), list(good.images), good.options)
    assert submitted == 1


def test_undecodable_image_fails_only_its_own_request(m) -> None:
    good = ask(m, "Fine question.", greedy(m, 12))

    async def main():
        async with Engine(m) as eng:
            ok = eng.submit(good)
            broken = eng.submit(ask(m, "What is this?", greedy(m, 12), image=b"definitely not an image"))
            ok_task = asyncio.create_task(bounded(collect(ok)))
            with pytest.raises(RequestRejected) as info:
                await bounded(collect(broken))
            result = await ok_task
            assert await wait_until(lambda: not eng.scheduler.running and not eng._seqs)
            again = await bounded(eng.generate(ask(m, "Still there?", greedy(m, 3, min_length=4))))
            return info.value, result, again

    error, (_, final), again = asyncio.run(main())
    assert type(error) is RequestRejected and error.reason == "image" and error.image_index == 0
    assert "image format" in error.detail
    assert not hasattr(error, "user_message")  # the model carries no user-facing text
    assert list(final.token_ids) == alone_ids(m, list(good.turns), list(good.images), good.options)
    assert again.completion_tokens == 3


def test_the_undecodable_picture_is_named_by_its_index(m) -> None:
    turns = [user("One."), assistant("A picture."), user("Two?")]

    async def main():
        async with Engine(m) as eng:
            with pytest.raises(RequestRejected) as info:
                await bounded(eng.generate(EngineRequest(turns=turns, images=[PICTURE, b""], options=greedy(m, 3))))
            return info.value

    error = asyncio.run(main())
    assert (error.reason, error.image_index) == ("image", 1)
    assert "empty" in error.detail


def test_prompt_and_image_count_mismatch_raises_at_submit(m) -> None:
    async def main():
        async with Engine(m) as eng:
            errors = []
            for match, request in (
                ("1 image placeholder", EngineRequest(turns=[user("Look.")], images=[], options=greedy(m, 3))),
                ("0 image placeholder", EngineRequest(prompt="No marker.", images=[PICTURE], options=greedy(m, 3))),
                ("2 image", EngineRequest(turns=[user("Look.")], images=[PICTURE, OTHER], options=greedy(m, 3))),
                ("turns or a prompt", EngineRequest(images=[], options=greedy(m, 3))),
            ):
                with pytest.raises(RequestRejected, match=match) as info:
                    eng.submit(request)
                errors.append(info.value)
            return eng.metrics.submitted, eng.scheduler.queue_depth, errors

    submitted, depth, errors = asyncio.run(main())
    assert (submitted, depth) == (0, 0)
    assert all(type(e) is RequestRejected and e.reason == "invalid" and e.image_index is None for e in errors)


def test_a_turn_the_template_refuses_is_rejected_as_invalid(m) -> None:
    async def main():
        async with Engine(m) as eng:
            with pytest.raises(RequestRejected, match="reserved marker") as info:
                eng.submit(ask(m, "What is <ImageHere> here?", greedy(m, 3)))
            return info.value, eng.metrics.submitted

    error, submitted = asyncio.run(main())
    assert error.reason == "invalid" and submitted == 0


def test_a_crashing_step_fails_the_running_requests_and_the_engine_goes_on(m, monkeypatch) -> None:
    async def main():
        async with Engine(m) as eng:
            real, calls = eng.runner.decode, []

            def decode():
                calls.append(1)
                if len(calls) == 2:
                    raise RuntimeError("device-side assert (simulated)")
                return real()

            monkeypatch.setattr(eng.runner, "decode", decode)
            with pytest.raises(RequestFailed) as info:
                await bounded(collect(eng.submit(ask(m, "Long.", endless(m, 50)))))
            assert await wait_until(lambda: not eng.scheduler.running and not eng._seqs)
            after = await bounded(eng.generate(ask(m, "Again.", greedy(m, 3, min_length=4))))
            return info.value, after

    error, after = asyncio.run(main())
    assert type(error) is RequestFailed and "simulated" in str(error)
    assert isinstance(error.__cause__, RuntimeError)
    assert after.completion_tokens == 3


def test_a_request_that_fails_to_prefill_fails_alone(m, monkeypatch) -> None:
    good = ask(m, "Fine question.", greedy(m, 6), user="good")

    async def main():
        async with Engine(m) as eng:
            real = eng.runner.prefill

            def prefill(seq):
                if seq.request.user == "bad":
                    raise RuntimeError("out of memory (simulated)")
                return real(seq)

            monkeypatch.setattr(eng.runner, "prefill", prefill)
            ok = eng.submit(good)
            bad = eng.submit(ask(m, "Other question.", greedy(m, 6), user="bad"))
            ok_task = asyncio.create_task(bounded(collect(ok)))
            with pytest.raises(RequestFailed) as info:
                await bounded(collect(bad))
            result = await ok_task
            assert await wait_until(lambda: not eng.scheduler.running and not eng._seqs)
            return info.value, result

    error, (_, final) = asyncio.run(main())
    assert "simulated" in str(error) and isinstance(error.__cause__, RuntimeError)
    assert list(final.token_ids) == alone_ids(m, list(good.turns), list(good.images), good.options)


def test_a_request_id_in_use_is_rejected(m) -> None:
    async def main():
        async with Engine(m) as eng:
            stream = eng.submit(ask(m, "One.", endless(m), request_id="same"))
            with pytest.raises(RequestRejected, match="already in use") as info:
                eng.submit(ask(m, "Two.", greedy(m, 3), request_id="same"))
            assert info.value.reason == "invalid"
            stream.cancel()

    asyncio.run(main())


def test_busy_when_the_queue_is_full(m) -> None:
    config = EngineConfig(scheduler=SchedulerConfig(max_batch=1, max_queue=2))

    async def main():
        async with Engine(m, config) as eng:
            first = eng.submit(ask(m, "Long 1.", endless(m), user="a"))
            seen = [await first.__anext__()]  # running: the next two wait in the queue
            queued = [eng.submit(ask(m, f"Long {i}.", endless(m), user=f"u{i}")) for i in (2, 3)]
            with pytest.raises(Busy) as info:
                eng.submit(ask(m, "Long 4.", endless(m), user="d"))
            snap = eng.snapshot()
        finals = [(await bounded(collect(s, e)))[1] for s, e in ((first, seen), (queued[0], []), (queued[1], []))]
        return info.value, snap, finals

    error, snap, finals = asyncio.run(main())
    assert isinstance(error, EngineError) and error.retry_after_s >= 1 and "queue full" in error.reason
    assert not hasattr(error, "user_message")
    assert snap["queue_depth"] == 2 and snap["batch_size"] == 1
    assert snap["rejected_busy"] == 1 and snap["submitted"] == 3
    assert [f.finish_reason for f in finals] == ["aborted"] * 3
    assert finals[0].completion_tokens >= 1 and finals[1].completion_tokens == finals[2].completion_tokens == 0
