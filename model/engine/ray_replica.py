"""The engine as a Ray Serve deployment: one :class:`~model.engine.engine.Engine` per replica (one per GPU).

:class:`EngineReplica`
    The deployment class.  Each replica loads the model once, runs one engine and streams a request's
    :class:`~model.engine.contract.TokenEvent` / :class:`~model.engine.contract.FinalEvent` back through
    ``handle.options(stream=True)``; a contract error comes as a :class:`~model.engine.ray_client.RemoteError`
    (the caller raises the original type again).  ``record_routing_stats`` reports the engine's gauges, which
    Ray Serve brings to every caller's router (and so to ``RayServeBackend.stats``).

:class:`ReplicaSpec`, :class:`ServeOptions`, :func:`build_app`
    What every replica builds (weights, ``[engine]`` limits) and how Serve runs them (the ``[ray]`` table),
    as the application ``serve.run`` takes, routed by
    :class:`~model.engine.ray_router.ConversationAffinityRouter` (its own module: Ray pickles it by value).

This module is loaded only when ``[engine] backend = "ray"`` (the ``local`` backend never imports Ray); the
caller's side is :mod:`model.engine.ray_client`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import RayServeException

from model.engine.contract import ChatTurn, EngineError, FinalEvent, TokenEvent
from model.engine.ray_client import RemoteError
from model.engine.ray_router import ConversationAffinityRouter

__all__ = ["EngineReplica", "ReplicaSpec", "ServeOptions", "build_app"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the replica


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica needs to build its engine, all plain values (it travels to every replica).

    ``loader_kwargs`` are ``model.load_minigpt4``'s arguments (paths must exist on every replica's node);
    ``demo`` = a variant name: each replica writes tiny demo weights (seeded, so every replica — and the
    local engine — has the same ones) into a folder of its own, loads them and deletes the folder.
    ``engine`` is an ``EngineConfig``.
    """

    loader_kwargs: Mapping[str, Any]
    engine: Any
    demo: str | None = None
    timeout_s: float | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def fingerprint(self, options: ServeOptions) -> str:
        """What a running application must match to be reused as it is (Ray Serve ≥ 2.x restarts every
        replica on each ``serve.run``, so a second bot process attaches instead of redeploying)."""
        from importlib import metadata

        try:
            package = metadata.version("minigpt4-bot")
        except metadata.PackageNotFoundError:
            package = "dev"
        text = repr((package, sorted(self.loader_kwargs.items()), self.engine, self.demo, self.timeout_s,
                     sorted(self.info.items()), options))  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()[:16]


_END = object()


class EngineReplica:
    """One Ray Serve replica: the model, one engine, and an ``EngineBackend`` over it."""

    def __init__(self, spec: ReplicaSpec, fingerprint: str = "") -> None:
        from model.engine.engine import Engine
        from model.engine.local_backend import EngineBackend
        from model.loader import load_minigpt4

        started = time.monotonic()
        kwargs = dict(spec.loader_kwargs)
        if spec.demo is None:
            model = load_minigpt4(**kwargs)
        else:  # a folder per replica: replicas starting together must not write the same files
            import tempfile

            from model.demo_weights import write_demo_weights

            with tempfile.TemporaryDirectory(prefix="minigpt4-demo-") as folder:
                model = load_minigpt4(**(kwargs | write_demo_weights(folder, spec.demo).loader_kwargs()))
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # constructed outside Serve (tests of the class itself)
            self.replica = "local"
        self.fingerprint = fingerprint
        self.backend = EngineBackend(Engine(model, spec.engine).start(), info=spec.info, timeout_s=spec.timeout_s)
        log.info("replica %s: model loaded and engine started in %.1f s", self.replica, time.monotonic() - started)

    async def stream(
        self,
        turns: Sequence[ChatTurn],
        images: Sequence[bytes],
        conversation_id: str,
        user: str,
        options: Mapping[str, Any],
    ) -> AsyncIterator[tuple[TokenEvent | FinalEvent | RemoteError, ...]]:
        """The engine's events for one request, in chunks: every event ready when Ray takes the next item
        (one token while the stream keeps up, several when sending is the bottleneck — each Ray item costs
        a serialization and a message).  A contract error comes as a :class:`RemoteError`, last."""
        ready: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for event in self.backend.stream(
                    turns=turns, images=images, conversation_id=conversation_id, user=user, options=options
                ):
                    ready.put_nowait(event)
            except EngineError as exc:
                ready.put_nowait(RemoteError.of(exc))
            finally:
                ready.put_nowait(_END)

        task = asyncio.create_task(pump())
        try:
            while True:
                items = [await ready.get()]
                while not ready.empty():
                    items.append(ready.get_nowait())
                chunk = tuple(item for item in items if item is not _END)
                if chunk:
                    yield chunk
                if items[-1] is _END:
                    return
        finally:  # the caller cancelled (or the generator was closed): the engine request is aborted
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        return {**self.backend.describe(), "replica": self.replica, "fingerprint": self.fingerprint}

    def stats(self) -> dict[str, Any]:
        """The engine's snapshot, plus this replica's id, process and the GPUs Ray gave it (logical ids)."""
        import os

        import ray

        gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        return {**self.backend.stats(), "replica": self.replica, "pid": os.getpid(), "gpu_ids": list(gpus)}

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica whose engine worker is gone is replaced."""
        worker = self.backend.engine._thread
        if worker is None or not worker.is_alive():
            raise RuntimeError("the engine's worker thread is not running")

    def record_routing_stats(self) -> dict[str, Any]:
        """Called by Ray Serve every ``request_routing_stats_period_s``; reaches every caller's router."""
        return self.stats()

    def __del__(self) -> None:  # Serve calls it on a graceful replica shutdown
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.engine.stop(timeout=5.0)


# ----------------------------------------------------------------------------- the deployment


@dataclass(frozen=True)
class ServeOptions:
    """The ``[ray]`` table as the deployment reads it, built from ``RaySettings.model_dump()`` by
    :func:`bot.cli.ray_backend.serve_options` — the table's fields have no default here, so they cannot drift
    from the table's; ``max_ongoing_requests`` comes resolved (``0`` → ``[engine] max_batch``).

    ``replicas`` is the fixed count, or the initial one when ``max_replicas`` > 0 turns on autoscaling
    between ``min_replicas`` and ``max_replicas`` around ``target_ongoing_requests`` per replica.  The last
    three fields are the engine side's own (not in ``[ray]``).
    """

    app_name: str
    replicas: int
    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float
    num_gpus: float
    num_cpus: float
    max_ongoing_requests: int
    max_queued_requests: int
    affinity: bool
    deployment_name: str = "MiniGPT4Engine"
    max_imbalance: int | None = -1  # -1: a quarter of max_ongoing_requests (at least 2); None: only a full home
    routing_stats_period_s: float = 2.0

    @property
    def imbalance(self) -> int | None:
        """Ongoing requests a conversation's home may have above the least loaded replica and still be chosen."""
        if self.max_imbalance is None or self.max_imbalance >= 0:
            return self.max_imbalance
        return max(2, self.max_ongoing_requests // 4)

    def deployment_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            name=self.deployment_name,
            ray_actor_options={"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
            max_ongoing_requests=self.max_ongoing_requests,
            max_queued_requests=self.max_queued_requests,
            request_router_config=RequestRouterConfig(
                # Ray types RequestRouterConfig.__init__(**kwargs: dict[str, Any]): every argument as a dict
                request_router_class=ConversationAffinityRouter,  # type: ignore[arg-type]
                request_router_kwargs={"affinity": self.affinity, "max_imbalance": self.imbalance},
                request_routing_stats_period_s=self.routing_stats_period_s,  # type: ignore[arg-type]
                request_routing_stats_timeout_s=max(self.routing_stats_period_s, 5.0),  # type: ignore[arg-type]
            ),
            health_check_period_s=10.0,  # check_health: is the engine's worker thread alive
            health_check_timeout_s=30.0,  # lenient: a replica in a big batch may answer late
            graceful_shutdown_timeout_s=30.0,  # answers in flight get this long when a replica is replaced
            max_constructor_retry_count=2,  # weights that do not load fail the deployment soon, not after 20 tries
        )
        if self.max_replicas > 0:
            kwargs["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "initial_replicas": min(max(self.replicas, self.min_replicas), self.max_replicas),
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            kwargs["num_replicas"] = self.replicas
        return kwargs


def build_app(spec: ReplicaSpec, options: ServeOptions) -> Any:
    """The Ray Serve application (``serve.run`` it): one deployment of :class:`EngineReplica`."""
    # serve.deployment's overloads type a class argument as the decorator form (Ray's annotation)
    deployment = serve.deployment(EngineReplica).options(**options.deployment_kwargs())  # type: ignore[attr-defined]
    return deployment.bind(spec, spec.fingerprint(options))
