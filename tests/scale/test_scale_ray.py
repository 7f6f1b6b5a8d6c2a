"""The Ray Serve backend on a real local Ray cluster (CPU, tiny demo weights), built by its entry-point plugin.

One module-scoped cluster: ``ray.init(num_cpus=4, num_gpus=2)`` — the two GPUs are Ray's *logical*
resources, declared so that ``[ray] num_gpus = 1`` places one replica per GPU exactly as on a GPU box —
and one Serve application of two replicas with two slots each and a caller queue of two.  The tests run
in file order; the last one kills a replica.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "minigpt4-bot[ray]" (.ci/run installs it)')
pytest.importorskip("ray.serve", reason='Ray Serve is not installed: pip install "minigpt4-bot[ray]"')

from PIL import Image  # noqa: E402

from bot.core.backend_api import GenerationBackend  # noqa: E402
from bot.core.config import Settings  # noqa: E402
from bot.core.plugins import BACKENDS, load_plugin  # noqa: E402
from bot.core.requests import Delta, Final, ImageAttachment, Request, ThreadRef  # noqa: E402
from bot.core.service import BotService  # noqa: E402
from model.engine import Engine, EngineBackend  # noqa: E402
from model.engine.contract import Busy, FinalEvent, TokenEvent  # noqa: E402
from model.engine.ray_client import RayServeBackend  # noqa: E402
from model.image_processing import builtin_test_image  # noqa: E402
from storage import Database, sqlite_url  # noqa: E402
from tests.contracts.backend_contract import BackendContract, BackendDriver  # noqa: E402
from tests.pictures import encode_png  # noqa: E402

GREEDY = {"do_sample": False, "max_new_tokens": 8, "repetition_penalty": 1.0}
LONG = {"do_sample": False, "max_new_tokens": 400, "min_length": 401, "max_length": 1000}
APP = "scale-test"


PICTURE = encode_png(builtin_test_image(224))
OTHER = encode_png(Image.new("RGB", (96, 64), (20, 120, 220)))
FIRST = [{"role": "user", "text": "What is this?", "image": True}]


def _follow_up(answer: str) -> list[dict[str, Any]]:
    return [*FIRST, {"role": "assistant", "text": answer}, {"role": "user", "text": "And the colour?"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Ray (4 CPUs, 2 logical GPUs) and the application, deployed by ``[engine] backend = "ray"``'s plugin."""
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
             namespace="minigpt4-scale-tests", log_to_driver=False)  # fmt: skip
    settings = Settings.model_validate(
        {
            "data_dir": str(tmp_path_factory.mktemp("ray-data")),
            "model": {"device": "cpu"},
            "generation": GREEDY,
            "engine": {"backend": "ray", "max_batch": 4, "request_timeout_s": 120},
            "ray": {"app_name": APP, "replicas": 2, "num_gpus": 1, "num_cpus": 1, "max_ongoing_requests": 2,
                    "max_queued_requests": 2},
        }
    )  # fmt: skip
    try:
        backend = asyncio.run(load_plugin(BACKENDS, "ray").start(settings))
        yield {"backend": backend, "settings": settings}
        asyncio.run(backend.close())
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _run(main: Callable[[], Any], timeout: float = 60.0) -> Any:
    async def outer() -> Any:
        return await asyncio.wait_for(main(), timeout)

    return asyncio.run(outer())


async def _drain(backend: GenerationBackend, conversation: str, turns: list[dict[str, Any]] = FIRST,
                 images: list[bytes] | None = None, options: dict[str, Any] = GREEDY) -> list[Any]:  # fmt: skip
    stream = backend.stream(turns=turns, images=[PICTURE] if images is None else images,
                            conversation_id=conversation, user="u1", options=options)  # fmt: skip
    return [event async for event in stream]


def _reported(backend: RayServeBackend) -> dict[str, dict[str, Any]]:
    """Both replicas' engine stats, once Ray Serve has collected them from each (empty until then)."""
    stats = backend.replica_stats()
    return stats if len(stats) == 2 and all(s.get("replica") for s in stats.values()) else {}


async def _wait_for(predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)
    return value


def test_scale_the_plugin_deploys_one_replica_per_gpu(cluster: dict[str, Any]) -> None:
    backend = cluster["backend"]
    assert isinstance(backend, RayServeBackend) and isinstance(backend, GenerationBackend)
    assert backend.describe() == {"variant": "vicuna0", "device": "cpu", "dtype": "float32", "demo": True,
                                  "backend": "ray"}  # fmt: skip

    async def main() -> dict[str, Any]:
        await _drain(backend, "scale-warm")  # the handle's router exists once a request went through it
        return await _wait_for(lambda: _reported(backend))

    stats = _run(main)
    assert sorted(tuple(s["gpu_ids"]) for s in stats.values()) == [("0",), ("1",)]  # Ray's placement
    assert len({s["pid"] for s in stats.values()}) == 2
    assert _run(backend.problem) is None


def test_scale_a_second_bot_process_attaches_to_the_running_application(cluster: dict[str, Any], caplog) -> None:
    """Ray Serve restarts every replica on each ``serve.run``; a bot starting with the same settings attaches."""
    caplog.set_level("INFO", logger="bot.cli.ray_backend")
    before = _run(lambda: _wait_for(lambda: _reported(cluster["backend"])))
    second = asyncio.run(load_plugin(BACKENDS, "ray").start(cluster["settings"]))
    assert "using the running Serve application 'scale-test' (same settings)" in caplog.text
    assert _run(lambda: _drain(second, "scale-second"))[-1].completion_tokens == 8
    asyncio.run(second.close())  # it did not start Ray: closing leaves the application to the others
    after = _run(lambda: _wait_for(lambda: _reported(cluster["backend"])))
    assert {s["pid"] for s in after.values()} == {s["pid"] for s in before.values()}  # no replica restarted
    assert _run(cluster["backend"].problem) is None


def test_scale_streaming_through_the_handle_gives_the_local_engine_s_greedy_ids(
    cluster: dict[str, Any], demo_models: Any
) -> None:
    async def main() -> tuple[list[Any], list[Any]]:
        local = EngineBackend(Engine(demo_models["vicuna0"]).start())
        try:
            expected = await _drain(local, "local")
        finally:
            await local.close()
        return expected, await _drain(cluster["backend"], "scale-parity")

    expected, events = _run(main)
    tokens, final = events[:-1], events[-1]
    assert all(type(e) is TokenEvent for e in tokens) and type(final) is FinalEvent  # the contract's own types
    assert [t.index for t in tokens] == list(range(len(tokens))) and len(tokens) == final.completion_tokens
    assert final.token_ids == expected[-1].token_ids and len(final.token_ids) == 8
    assert "".join(t.text for t in tokens) == final.text == expected[-1].text


def test_scale_a_follow_up_hits_the_replica_holding_its_prefix(cluster: dict[str, Any]) -> None:
    backend: RayServeBackend = cluster["backend"]
    conversations = [f"scale-thread-{i}" for i in range(12)]

    async def main() -> tuple[dict[str, FinalEvent], dict[str, FinalEvent]]:
        first = {c: (await _drain(backend, c))[-1] for c in conversations}
        follow = {}
        for batch in zip(conversations[::2], conversations[1::2], strict=True):  # two at a time (the caller queue)
            finals = await asyncio.gather(*(_drain(backend, c, _follow_up(first[c].text)) for c in batch))
            follow |= {c: events[-1] for c, events in zip(batch, finals, strict=True)}
        return first, follow

    first, follow = _run(main, timeout=120)
    assert all(f.reused_prefix_tokens == 0 for f in first.values())
    for conversation, final in follow.items():  # every follow-up found its thread's KV on its replica
        assert final.reused_prefix_tokens > 0, conversation
        assert final.reused_prefix_tokens >= first[conversation].prompt_tokens - 1
    (router,) = backend.routers()
    placed = {router.placements[c].unique_id for c in conversations}
    assert len(placed) == 2  # the threads are spread over both replicas, each follow-up went home
    assert router.routed["home"] >= len(conversations)

    reused = sum(f.reused_prefix_tokens for f in follow.values())

    async def hits() -> Any:  # the replicas' own counters, as Ray Serve's routing stats bring them (every 2 s)
        def all_reported() -> bool:
            stats = _reported(backend)
            return (
                bool(stats)
                and all(s["reused_prefix_tokens"] > 0 for s in stats.values())
                and (sum(s["reused_prefix_tokens"] for s in stats.values()) >= reused)
            )

        await _wait_for(all_reported)
        return backend.stats()

    total = _run(hits)
    assert total["replicas"] == 2 and total["prefix_cache_hit_rate"] > 0 and total["reused_prefix_tokens"] >= reused


class TestRayBackendContract(BackendContract):
    """The backend contract suite (``tests/contracts/backend_contract.py``) on this module's cluster."""

    @pytest.fixture
    def driver(self, cluster: dict[str, Any]) -> BackendDriver:
        backend: RayServeBackend = cluster["backend"]
        _run(lambda: _wait_for(lambda: _reported(backend)))
        before = backend.stats()["finish_reasons"].get("aborted", 0)

        async def idle() -> bool:
            """Idle, and the closed request counted as aborted (replica stats arrive late: the next test counts)."""
            stats = backend.stats()
            aborted = stats["finish_reasons"].get("aborted", 0) > before
            return aborted and stats["batch_size"] == 0 and stats["queue_depth"] == 0

        return BackendDriver(backend, lambda coro: _run(lambda: coro), idle)


def test_scale_closing_the_stream_cancels_the_replica_s_request(cluster: dict[str, Any]) -> None:
    backend: RayServeBackend = cluster["backend"]

    def aborted() -> int:
        return backend.stats()["finish_reasons"].get("aborted", 0)

    async def main() -> tuple[int, dict[str, Any]]:
        await _wait_for(lambda: _reported(backend))
        before = aborted()
        streams = [backend.stream(turns=FIRST, images=[PICTURE], conversation_id=f"scale-leave-{i}", user="u1",
                                  options=LONG) for i in range(2)]  # fmt: skip
        for stream in streams:
            for _ in range(3):
                assert isinstance(await anext(stream), TokenEvent)
        for stream in streams:  # the user left: the front end closes the reply iterator
            await stream.aclose()
        await _wait_for(lambda: aborted() >= before + 2)
        idle = await _wait_for(lambda: (s := backend.stats())["batch_size"] == 0 and s["queue_depth"] == 0 and s)
        return aborted() - before, idle

    count, idle = _run(main)
    assert count == 2 and idle["generated_tokens"] < idle["finished"] * 400  # stopped long before 400 tokens


def test_scale_a_user_leaving_the_core_s_reply_cancels_the_replica_s_request(
    cluster: dict[str, Any], tmp_path: Path
) -> None:
    """What a front end does when its user goes: close ``handle()``'s iterator.  Before ``aclose()`` returns
    the answer is marked interrupted, and the replica stops generating (an ``aborted`` finish)."""
    backend: RayServeBackend = cluster["backend"]
    settings = cluster["settings"].model_copy(update={"generation": cluster["settings"].generation.model_copy(
        update={"max_new_tokens": 400, "min_length": 401, "max_length": 1000})})  # fmt: skip

    async def main() -> tuple[list[str], int]:
        db = Database(sqlite_url(tmp_path / "bot.db"))
        await db.create_all()
        service = BotService(settings, db, backend)
        try:
            await _wait_for(lambda: _reported(backend))
            before = backend.stats()["finish_reasons"].get("aborted", 0)
            ask = Request("web", "W", "C", "t-leave", "alice", "What is this?", images=(ImageAttachment(OTHER),))
            reply = service.handle(ask)
            for _ in range(3):
                assert isinstance(await anext(reply), Delta)
            await reply.aclose()
            view = await service.thread(ThreadRef("web", "W", "C", "t-leave"), turns=True)
            await _wait_for(lambda: backend.stats()["finish_reasons"].get("aborted", 0) > before)
            return [t.status for t in view.turns], backend.stats()["finish_reasons"]["aborted"] - before
        finally:
            await db.dispose()

    statuses, aborted = _run(main)
    assert statuses == ["done", "interrupted"] and aborted == 1


def test_scale_overload_gives_busy(cluster: dict[str, Any]) -> None:
    """2 replicas x 2 slots, all answering, + a caller queue of 2: what comes on top is Busy at once, what
    was queued is answered once a slot frees up."""
    backend = cluster["backend"]

    async def queued_or_busy(i: int) -> str:
        try:
            events = await _drain(backend, f"scale-busy-{i}")
        except Busy as exc:
            assert exc.retry_after_s > 0
            return "busy"
        assert isinstance(events[-1], FinalEvent) and events[-1].completion_tokens == 8
        return "answered"

    async def main() -> list[str]:
        running = []
        for i in range(4):  # fill every slot with a long answer
            stream = backend.stream(turns=FIRST, images=[PICTURE], conversation_id=f"scale-long-{i}", user="u1",
                                    options=LONG)  # fmt: skip
            assert isinstance(await anext(stream), TokenEvent)
            running.append(stream)
        late = [asyncio.create_task(queued_or_busy(i)) for i in range(5)]
        done, queued = await asyncio.wait(late, timeout=1.0)  # the overflow is answered Busy right away
        busy = [t.result() for t in done]
        leaving = queued.pop()  # a user gives up while waiting for a replica: the routing is cancelled
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        for stream in running:  # the long answers end (their users leave): the queued ones get slots
            await stream.aclose()
        return [*busy, "left", *[await t for t in queued]]

    outcomes = _run(main, timeout=120)
    assert sorted(outcomes) == ["answered", "busy", "busy", "busy", "left"]  # 2 queued (1 left, 1 served), 3 Busy
    assert _run(lambda: _drain(backend, "scale-after-busy"))[-1].completion_tokens == 8  # and then it serves again


def test_scale_weights_that_do_not_load_fail_the_start_in_one_line(cluster: dict[str, Any], tmp_path: Path) -> None:
    from bot.cli.ray_backend import RaySetupError

    settings = cluster["settings"].model_copy(
        update={
            "model": cluster["settings"].model.model_copy(update={"llm": str(tmp_path / "nowhere"), "vit": "x.pth"}),
            "ray": cluster["settings"].backend("ray").model_copy(update={"app_name": "scale-broken", "replicas": 1,
                                                              "num_gpus": 0, "num_cpus": 0.5}),
        }
    )  # fmt: skip
    with pytest.raises(RaySetupError, match=r"the engine replicas did not start: .*CheckpointError: .*\(\[model\]"):
        asyncio.run(load_plugin(BACKENDS, "ray").start(settings))
    from ray import serve

    serve.delete("scale-broken")
    assert _run(lambda: _drain(cluster["backend"], "scale-still-fine"))[-1].completion_tokens == 8


def test_scale_a_replica_killed_mid_answer_fails_the_turn_and_the_next_request_succeeds(
    cluster: dict[str, Any], tmp_path: Path
) -> None:
    backend: RayServeBackend = cluster["backend"]
    settings = cluster["settings"].model_copy(update={"generation": cluster["settings"].generation.model_copy(
        update={"max_new_tokens": 400, "min_length": 401, "max_length": 1000})})  # fmt: skip
    url = sqlite_url(tmp_path / "bot.db")

    async def main() -> tuple[list[Any], list[Any], list[Any]]:
        db = Database(url)
        await db.create_all()
        service = BotService(settings, db, backend)
        try:
            ask = Request("web", "W", "C", "t-kill", "alice", "What is this?", images=(ImageAttachment(OTHER),),
                          event_id="e1")  # fmt: skip
            replies: list[Any] = []
            killed = False
            async for event in service.handle(ask):
                replies.append(event)
                if not killed and sum(isinstance(e, Delta) for e in replies) >= 3:
                    conversation = backend.routers()[0]
                    view = await service.thread(ThreadRef("web", "W", "C", "t-kill"))
                    assert view.live
                    # The service names a conversation by its row id; the module's other tests by words.
                    (placed,) = [r for c, r in conversation.placements.items() if c.isdigit()]
                    pid = (await _wait_for(lambda: _reported(backend)))[placed.unique_id]["pid"]
                    os.kill(pid, signal.SIGKILL)  # the replica's process dies mid-answer
                    killed = True
            again = [e async for e in service.handle(Request("web", "W", "C", "t-kill", "alice", "Try again?",
                                                             event_id="e2"))]  # fmt: skip
            view = await service.thread(ThreadRef("web", "W", "C", "t-kill"), turns=True)
            return replies, again, list(view.turns)
        finally:
            await db.dispose()

    replies, again, turns = _run(main, timeout=120)
    final = replies[-1]
    assert isinstance(final, Final) and final.kind == "error" and "try again" in final.text.lower()
    assert isinstance(again[-1], Final) and again[-1].kind == "answer"  # the surviving replica answers
    # Nothing stored twice; the failed answer is marked failed, not lost or left streaming.
    assert [(t.role, t.status) for t in turns] == [
        ("user", "done"), ("assistant", "failed"), ("user", "done"), ("assistant", "done")]  # fmt: skip
