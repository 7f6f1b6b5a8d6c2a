"""Thread affinity for the Ray Serve backend: a request router keyed by conversation id.

A conversation goes to the replica that served it last — the one holding its image tokens and KV
prefix — while that replica has room: fewer than ``max_ongoing_requests`` ongoing, and not more than
``max_imbalance`` requests above the least loaded replica (a thread's prefix is worth a few queued
requests, not a replica idling while another one queues).  Otherwise it goes to the least loaded other
replica, which then becomes its home.  A conversation this caller has not routed
yet starts on its consistent-hash home (a ring of virtual nodes over the replica ids), so several bot
processes sharing one cluster put a thread on the same replica without talking to each other.  With
``affinity=False`` it is power of two choices, the policy of Ray's default router.

The key is ``handle.options(session_id=<conversation id>)`` (``RequestMetadata.session_id``, present in
the pinned Ray 2.60).  The API is Ray Serve's ``RequestRouter`` (``ray.serve.request_router``, alpha):
Serve calls :meth:`choose_replicas` for ranked tiers of candidates, picks the least loaded replica with
room in the first tier that has one (probing queue lengths), backs off and asks again when none has room,
and calls :meth:`on_request_routed` with the replica that accepted the request.  Ray 2.60 also ships
``ray.serve.experimental.consistent_hash_router.ConsistentHashRouter`` on the same key; it walks the ring
on overflow instead of taking the least loaded replica, and it does not remember where an overflowed
thread went — this router does both.

Ray pickles this module **by value** into every caller (``RequestRouterConfig`` registers it with
cloudpickle), so it imports only the standard library and Ray at module level; a router registers itself at
run time with :func:`model.engine.ray_client.register_router` (a module imported by reference), which is how
``RayServeBackend.stats`` finds it.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

__all__ = ["ConversationAffinityRouter", "ring_hash"]


def ring_hash(key: str) -> int:
    """A 64-bit hash that is the same in every process (Python's ``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class ConversationAffinityRouter(RequestRouter):
    """Routes a conversation's requests to the replica holding its KV prefix while it has room.

    Keyword arguments (``RequestRouterConfig.request_router_kwargs``): ``affinity`` (default true;
    false = power of two choices), ``max_imbalance`` (ongoing requests the home may have above the least
    loaded replica and still be chosen; default none = only a full home is skipped), ``virtual_nodes``
    per replica on the hash ring (64), and ``max_conversations`` remembered (100,000; the least recently
    routed is forgotten first).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.affinity, self.virtual_nodes, self.max_conversations = True, 64, 100_000
        self.max_imbalance: int | None = None
        self.placements: OrderedDict[str, ReplicaID] = OrderedDict()
        # Where routed requests went: the conversation's remembered replica ("home"), a first request
        # ("new"), another replica because home had no room ("moved"), or no conversation id ("unkeyed");
        # "balanced": how often the home was passed over for being too far above the least loaded replica.
        self.routed = {"home": 0, "new": 0, "moved": 0, "unkeyed": 0, "balanced": 0}
        self._ring: list[tuple[int, ReplicaID]] = []
        self._ring_ids: frozenset[ReplicaID] = frozenset()
        try:  # the caller's registry (model.engine.ray_client, which imports no router), for the backend's stats()
            from model.engine.ray_client import register_router

            register_router(self)
        except ImportError:  # a process without the bot's package (nothing reads stats there)
            pass

    def initialize_state(
        self,
        affinity: bool = True,
        max_imbalance: int | None = None,
        virtual_nodes: int = 64,
        max_conversations: int = 100_000,
        **_: Any,
    ) -> None:
        self.affinity = bool(affinity)
        self.max_imbalance = None if max_imbalance is None else int(max_imbalance)
        self.virtual_nodes = int(virtual_nodes)
        self.max_conversations = int(max_conversations)

    @property
    def deployment_id(self) -> Any:
        return self._deployment_id

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._rebuild_ring()

    def _rebuild_ring(self) -> None:
        ids = frozenset(self._replica_id_set)
        if ids != self._ring_ids:
            ring = [(ring_hash(f"{rid.unique_id}:{i}"), rid) for rid in ids for i in range(self.virtual_nodes)]
            self._ring = sorted(ring, key=lambda pair: pair[0])
            self._ring_ids = ids

    def ring_home(self, key: str) -> ReplicaID | None:
        """The conversation's replica on the consistent-hash ring (the same in every caller process)."""
        if not self._ring:
            return None
        index = bisect.bisect_right(self._ring, ring_hash(key), key=lambda pair: pair[0]) % len(self._ring)
        return self._ring[index][1]

    def home(self, key: str) -> ReplicaID | None:
        """Where the conversation's KV prefix should be: where it was last routed, else its ring home."""
        remembered = self.placements.get(key)
        return remembered if remembered in self._replicas else self.ring_home(key)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """Ranked tiers: the conversation's home alone, then every other replica (Serve takes the least
        loaded one with room).  None has room: Serve backs off and asks again."""
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # no busy loop while every replica is full
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if not self.affinity or not key:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        home_id = self.home(key)
        home = self._replicas.get(home_id) if home_id is not None else None
        others = [r for r in candidate_replicas if r.replica_id != home_id]
        random.shuffle(others)  # equal queue lengths: spread the overflow, not always onto the first
        if home is None:
            return [others]
        if others and self._too_busy(home, others):
            self.routed["balanced"] += 1
            return [others, [home]]
        return [[home], others]

    def _too_busy(self, home: RunningReplica, others: list[RunningReplica]) -> bool:
        """Whether the home has more than ``max_imbalance`` ongoing requests above the least loaded other
        replica, by Serve's queue-length cache (what it last heard; unknown counts as not too busy)."""
        if self.max_imbalance is None or not self._use_replica_queue_len_cache:
            return False
        cache = self._replica_queue_len_cache
        mine = cache.get(home.replica_id)
        theirs = [n for n in (cache.get(r.replica_id) for r in others) if n is not None]
        return mine is not None and bool(theirs) and mine - min(theirs) > self.max_imbalance

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Remember where the conversation went: its next request finds its KV prefix there."""
        key = pending_request.metadata.session_id
        if not self.affinity or not key:
            self.routed["unkeyed"] += 1
            return
        before = self.placements.get(key)
        self.routed["new" if before is None else "home" if before == replica_id else "moved"] += 1
        self.placements[key] = replica_id
        self.placements.move_to_end(key)
        while len(self.placements) > self.max_conversations:
            self.placements.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._rebuild_ring()
        for key in [k for k, r in list(self.placements.items()) if r == replica_id]:
            del self.placements[key]

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        """The latest ``record_routing_stats`` of every running replica, by replica id."""
        return {rid.unique_id: dict(r.routing_stats) for rid, r in list(self._replicas.items())}
