"""The conversation-affinity request router, driven through Ray Serve's own routing loop without a cluster.

``ConversationAffinityRouter`` only ranks replicas; choosing among a tier (probing queue lengths,
skipping full replicas, backing off when every replica is full) is Ray's
``RequestRouter._choose_replica_for_request``, which these tests run for real against replicas that
report a queue length.  The cluster tests (``test_scale_ray.py``) then show the same on real replicas.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason='Ray Serve is not installed: pip install "minigpt4-bot[ray]" (.ci/run does)')

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from model.engine.ray_router import ConversationAffinityRouter

DEPLOYMENT = DeploymentID(name="MiniGPT4Engine", app_name="scale-test")


class FakeReplica:
    """What a router sees of a replica: its id, its slot count and (probed) queue length."""

    def __init__(self, name: str, max_ongoing: int = 2) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.max_ongoing_requests = max_ongoing
        self.ongoing = 0
        self.routing_stats: dict[str, Any] = {"replica": name}
        self.multiplexed_model_ids: set[str] = set()
        self.node_id = "node"
        self.availability_zone = None
        self.is_cross_language = False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.ongoing


def _router(replicas: list[FakeReplica], cache: bool = False, **kwargs: Any) -> ConversationAffinityRouter:
    router = ConversationAffinityRouter(
        deployment_id=DEPLOYMENT,
        handle_source=DeploymentHandleSource.UNKNOWN,
        use_replica_queue_len_cache=cache,  # off: probe every time, the fake queue lengths are the truth
    )
    router.initialize_state(**kwargs)
    router.update_replicas(replicas)  # type: ignore[arg-type]
    return router


def _request(conversation: str) -> PendingRequest:
    rid = uuid.uuid4().hex
    meta = RequestMetadata(request_id=rid, internal_request_id=rid, session_id=conversation, is_streaming=True)
    return PendingRequest(args=[], kwargs={}, metadata=meta)


async def _route(router: ConversationAffinityRouter, conversation: str) -> FakeReplica:
    """One request through Ray's routing loop; like Serve's router, report where it went and count it."""
    request = _request(conversation)
    replica = await asyncio.wait_for(router._choose_replica_for_request(request), 5)
    router.on_request_routed(request, replica.replica_id, None)
    replica.ongoing += 1
    return replica


def test_scale_router_keeps_a_conversation_on_its_replica_while_it_has_room() -> None:
    async def main() -> None:
        replicas = [FakeReplica("r0"), FakeReplica("r1"), FakeReplica("r2")]
        router = _router(replicas)
        first = {}
        for conversation in (f"conv-{i}" for i in range(30)):
            first[conversation] = await _route(router, conversation)
            first[conversation].ongoing = 0  # answered before the next one comes
        assert {r.replica_id.unique_id for r in first.values()} == {"r0", "r1", "r2"}  # spread by the ring
        for conversation, replica in first.items():  # follow-ups: same replica, every time
            assert await _route(router, conversation) is replica
            replica.ongoing = 0
        assert router.routed == {"home": 30, "new": 30, "moved": 0, "unkeyed": 0, "balanced": 0}

    asyncio.run(main())


def test_scale_router_overflows_to_the_least_loaded_replica_and_remembers_it() -> None:
    async def main() -> None:
        r0, r1, r2 = FakeReplica("r0"), FakeReplica("r1"), FakeReplica("r2")
        router = _router([r0, r1, r2])
        conversation = next(f"c{i}" for i in range(100) if router.ring_home(f"c{i}") == r0.replica_id)
        r0.ongoing, r1.ongoing, r2.ongoing = 2, 1, 0  # home full: r2 is the least loaded with room
        assert await _route(router, conversation) is r2
        r0.ongoing, r2.ongoing = 0, 0
        assert await _route(router, conversation) is r2  # its KV prefix is on r2 now, not on its ring home
        assert router.routed["moved"] == 0 and router.routed["new"] == 1 and router.routed["home"] == 1

        r2.ongoing = 2  # full again: it moves, and the move is counted
        assert await _route(router, conversation) in (r0, r1)
        assert router.routed["moved"] == 1

    asyncio.run(main())


def test_scale_router_leaves_a_home_far_busier_than_the_least_loaded_replica() -> None:
    """With ``max_imbalance``, a home that still has room but is far busier than another replica (by Serve's
    queue-length cache, as the real router keeps it) is passed over: a re-prefill beats a long queue."""

    async def main() -> None:
        r0, r1 = FakeReplica("r0", 64), FakeReplica("r1", 64)
        router = _router([r0, r1], cache=True, max_imbalance=8)
        conversation = next(f"c{i}" for i in range(100) if router.ring_home(f"c{i}") == r0.replica_id)
        r0.ongoing, r1.ongoing = 12, 2
        router.on_new_queue_len_info(r0.replica_id, 12)
        router.on_new_queue_len_info(r1.replica_id, 2)
        assert await _route(router, conversation) is r1 and router.routed["balanced"] == 1
        r1.ongoing = 9  # 12 vs 9: within the allowance, so the thread stays where its prefix now is (r1)
        router.on_new_queue_len_info(r1.replica_id, 9)
        assert await _route(router, conversation) is r1 and router.routed["home"] == 1

        relaxed = _router([r0, r1], cache=True, max_imbalance=None)  # default: only a full home is left
        assert await _route(relaxed, conversation) is r0

    asyncio.run(main())


def test_scale_router_waits_when_every_replica_is_full_then_takes_the_first_free() -> None:
    async def main() -> None:
        r0, r1 = FakeReplica("r0", 1), FakeReplica("r1", 1)
        r0.ongoing = r1.ongoing = 1
        router = _router([r0, r1])
        task = asyncio.create_task(_route(router, "waiting"))
        await asyncio.sleep(0.3)
        assert not task.done()  # Ray backs off (should_backoff) instead of spinning or overfilling
        r1.ongoing = 0
        assert await asyncio.wait_for(task, 5) is r1

    asyncio.run(main())


def test_scale_router_agrees_across_processes_and_forgets_dead_replicas() -> None:
    """Two bot processes (two routers, replicas listed in another order) put a new thread on the same
    replica; a replica that dies takes its conversations' placements with it."""

    async def main() -> None:
        a = _router([FakeReplica("r0"), FakeReplica("r1"), FakeReplica("r2")])
        b = _router([FakeReplica("r2"), FakeReplica("r0"), FakeReplica("r1")])
        homes = {c: a.ring_home(c) for c in (f"thread-{i}" for i in range(200))}
        assert all(b.ring_home(c) == home for c, home in homes.items())
        assert len(set(homes.values())) == 3

        replicas = {r.replica_id.unique_id: r for r in a._replicas.values()}  # type: ignore[attr-defined]
        placed = await _route(a, "thread-0")
        a.on_replica_actor_died(placed.replica_id)
        assert "thread-0" not in a.placements
        survivor = await _route(a, "thread-0")
        assert survivor is not placed and survivor.replica_id.unique_id in replicas

    asyncio.run(main())


def test_scale_router_without_affinity_is_power_of_two_choices() -> None:
    async def main() -> None:
        replicas = [FakeReplica("r0", 100), FakeReplica("r1", 100)]
        router = _router(replicas, affinity=False)
        seen = {(await _route(router, "same-thread")).replica_id.unique_id for _ in range(40)}
        assert seen == {"r0", "r1"}  # the least loaded of two: the thread is spread, its prefix is not followed
        assert router.routed["unkeyed"] == 40 and not router.placements

    asyncio.run(main())
