"""The engine as Ray Serve replicas: one :class:`~model.engine.engine.Engine` per replica (one per GPU),
a conversation-affinity request router, and the client side that speaks the backend contract.

Three pieces, all importing only ``model`` and ``ray`` (this module is loaded only when ``[engine]
backend = "ray"``; the ``local`` backend never imports Ray):

:class:`EngineReplica`
    The deployment class.  Each replica loads the model once, runs one engine and streams a request's
    :class:`~model.engine.api.TokenEvent` / :class:`~model.engine.api.FinalEvent` back through
    ``handle.options(stream=True)``.  The contract's errors do not survive pickling (their ``args`` are
    the formatted message), so a replica *yields* a :class:`RemoteError` in their place and the caller
    raises the original type again: a ``RequestRejected("image", …, image_index=1)`` raised in the
    replica arrives as exactly that.  ``record_routing_stats`` reports the engine's gauges, which Ray
    Serve brings to every caller's router (and so to :meth:`RayServeBackend.stats`).

:class:`~model.engine.ray_router.ConversationAffinityRouter` (its own module: Ray pickles it by value)
    Thread affinity: a Ray Serve ``RequestRouter`` keyed by ``handle.options(session_id=<conversation
    id>)`` that sends a conversation to the replica holding its KV prefix while that replica has room,
    else to the least loaded one.

:class:`RayServeBackend`
    The core's backend seam (``stream`` / ``describe`` / ``stats`` / ``close``) over a
    ``DeploymentHandle``.  Ray's failures become the contract's errors: ``BackPressureError`` (the
    caller's queue of ``max_queued_requests`` is full) → :class:`~model.engine.api.Busy`; a replica that
    died or is unreachable, or any other Ray error → :class:`~model.engine.api.RequestFailed`.  Closing
    the stream early (the user left, a timeout) cancels the Ray request, which cancels the replica's
    generator and so aborts the engine request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayError, TaskCancelledError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError, RayServeException

from model.engine.api import (
    Busy,
    ChatTurn,
    EngineError,
    FinalEvent,
    RequestFailed,
    RequestRejected,
    RequestTooLarge,
    TokenEvent,
)
from model.engine.ray_router import ConversationAffinityRouter

__all__ = [
    "EngineReplica",
    "RayServeBackend",
    "RemoteError",
    "ReplicaSpec",
    "ServeOptions",
    "build_app",
    "sum_replica_stats",
]

log = logging.getLogger(__name__)

BUSY_RETRY_AFTER_S = 5.0
"""What :class:`~model.engine.api.Busy` says when Ray Serve's caller-side queue is full (a guess: one short answer)."""


# ----------------------------------------------------------------------------- errors across the wire


@dataclass(frozen=True)
class RemoteError:
    """A contract error raised in a replica, as a plain picklable value; :meth:`error` rebuilds it."""

    kind: str  # "busy" | "rejected" | "too_large" | "failed"
    message: str
    reason: str = ""
    retry_after_s: float = 0.0
    image_index: int | None = None

    @classmethod
    def of(cls, exc: EngineError) -> RemoteError:
        if isinstance(exc, Busy):
            return cls("busy", str(exc), reason=exc.reason, retry_after_s=exc.retry_after_s)
        if isinstance(exc, RequestTooLarge):
            return cls("too_large", exc.detail, reason=exc.reason)
        if isinstance(exc, RequestRejected):
            return cls("rejected", exc.detail, reason=exc.reason, image_index=exc.image_index)
        return cls("failed", str(exc))

    def error(self) -> EngineError:
        if self.kind == "busy":
            return Busy(self.reason, self.retry_after_s)
        if self.kind == "too_large":
            return RequestTooLarge(self.message)
        if self.kind == "rejected":
            return RequestRejected(self.reason, self.message, image_index=self.image_index)  # type: ignore[arg-type]
        return RequestFailed(f"in the replica: {self.message}")


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
        from model.engine.backend import EngineBackend
        from model.engine.engine import Engine
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


# ----------------------------------------------------------------------------- the router


_ROUTERS: weakref.WeakSet[Any] = weakref.WeakSet()


def register_router(router: Any) -> None:
    """Called by each :class:`~model.engine.ray_router.ConversationAffinityRouter` this process creates (Ray
    pickles the router's module by value, so the registry must live here, imported by reference)."""
    _ROUTERS.add(router)


def sum_replica_stats(per_replica: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One engine-shaped snapshot for the whole deployment: counters and gauges summed, rates averaged
    (weighted by finished requests), plus ``replicas`` and the per-replica snapshots."""
    snapshots = [s for s in per_replica.values() if s]
    total: dict[str, Any] = {"replicas": len(per_replica), "per_replica": {k: dict(v) for k, v in per_replica.items()}}
    summed = ("queue_depth", "batch_size", "submitted", "finished", "rejected_busy", "generated_tokens",
              "tokens_per_s", "reused_prefix_tokens", "cached_prefix_tokens")  # fmt: skip
    for name in summed:
        total[name] = sum(s.get(name) or 0 for s in snapshots)
    weights = [max(1, s.get("finished") or 0) for s in snapshots]
    for name in ("image_cache_hit_rate", "prefix_cache_hit_rate", "mean_batch_size"):
        values = [(s.get(name) or 0.0, w) for s, w in zip(snapshots, weights, strict=True)]
        total[name] = sum(v * w for v, w in values) / sum(weights) if values else 0.0
    reasons: dict[str, int] = {}
    for snapshot in snapshots:
        for reason, count in (snapshot.get("finish_reasons") or {}).items():
            reasons[reason] = reasons.get(reason, 0) + count
    total["finish_reasons"] = reasons
    for name in ("ttft_first_p50_s", "ttft_follow_up_p50_s"):
        values = [s[name] for s in snapshots if s.get(name) is not None]
        total[name] = max(values) if values else None  # the slowest replica's median: what users wait for
    return total


# ----------------------------------------------------------------------------- the deployment


@dataclass(frozen=True)
class ServeOptions:
    """The Ray Serve side of the deployment (the ``[ray]`` table, already resolved).

    ``replicas`` is the fixed count, or the initial one when ``max_replicas`` > 0 turns on autoscaling
    between ``min_replicas`` and ``max_replicas`` around ``target_ongoing_requests`` per replica.
    """

    app_name: str = "minigpt4"
    deployment_name: str = "MiniGPT4Engine"
    replicas: int = 1
    min_replicas: int = 0
    max_replicas: int = 0
    target_ongoing_requests: float = 8.0
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    max_ongoing_requests: int = 16
    max_queued_requests: int = -1
    affinity: bool = True
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
                request_router_class=ConversationAffinityRouter,
                request_router_kwargs={"affinity": self.affinity, "max_imbalance": self.imbalance},
                request_routing_stats_period_s=self.routing_stats_period_s,
                request_routing_stats_timeout_s=max(self.routing_stats_period_s, 5.0),
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
    deployment = serve.deployment(EngineReplica).options(**options.deployment_kwargs())
    return deployment.bind(spec, spec.fingerprint(options))


# ----------------------------------------------------------------------------- the caller's side


def _cancel(response: Any) -> None:
    """Cancel a Ray Serve request: before it reached a replica, its routing; after, the replica's generator
    (a ``CancelledError`` there closes the engine stream, which aborts the engine request).  Ray re-raises
    the request's own failure here (a ``BackPressureError``…): that was reported already."""
    try:
        response.cancel()
    except (Exception, asyncio.CancelledError) as exc:  # cancelled before it reached a replica
        log.debug("ray backend: cancelling a request that had ended: %r", exc)


class RayServeBackend:
    """The backend seam over a ``DeploymentHandle`` to :class:`EngineReplica` replicas.

    ``info`` (from one replica's ``describe``) answers :meth:`describe`; ``on_close`` runs at
    :meth:`close` (the entry layer shuts down a Ray it started itself).
    """

    def __init__(
        self,
        handle: Any,
        *,
        info: Mapping[str, Any] | None = None,
        app_name: str = "minigpt4",
        on_close: Any = None,
    ) -> None:
        self.handle = handle
        self.info = dict(info or {})
        self.app_name = app_name
        self._on_close = on_close
        self._closed = False

    async def stream(
        self,
        *,
        turns: Sequence[ChatTurn],
        images: Sequence[bytes],
        conversation_id: str,
        user: str,
        options: Mapping[str, Any],
    ) -> AsyncIterator[TokenEvent | FinalEvent]:
        """One answer from a replica (chosen by :class:`ConversationAffinityRouter`); see the module docstring."""
        if self._closed:
            raise RequestFailed("the Ray Serve backend is closed")
        handle = self.handle.options(stream=True, method_name="stream", session_id=conversation_id)
        try:
            response = handle.remote(
                turns=list(turns), images=list(images), conversation_id=conversation_id, user=user,
                options=dict(options),
            )  # fmt: skip
        except Exception as exc:
            raise self._error(exc, conversation_id) from exc
        finished = False
        try:
            async for chunk in response:
                for item in chunk:
                    if isinstance(item, RemoteError):
                        finished = True
                        raise item.error()
                    yield item
                    if isinstance(item, FinalEvent):
                        finished = True
            if not finished:
                raise RequestFailed("the replica's stream ended without a final event")
            finished = True
        except EngineError:
            raise
        except Exception as exc:
            raise self._error(exc, conversation_id) from exc
        finally:
            if not finished:  # the user left, a timeout, an error: stop the replica's work too
                _cancel(response)

    @staticmethod
    def _error(exc: BaseException, conversation_id: str) -> EngineError:
        """The contract error for what Ray raised (logged here; the core only sees the type)."""
        if isinstance(exc, BackPressureError):
            return Busy("ray serve queue is full", BUSY_RETRY_AFTER_S)
        if isinstance(exc, RayActorError):
            log.error("ray backend: the replica serving conversation %s died: %s", conversation_id, exc)
            return RequestFailed(f"the replica died: {type(exc).__name__}")
        if isinstance(exc, RayError | RayServeException | TaskCancelledError):
            log.error("ray backend: request for conversation %s failed: %r", conversation_id, exc)
            return RequestFailed(f"ray serve: {type(exc).__name__}")
        log.error("ray backend: unexpected error for conversation %s", conversation_id, exc_info=exc)
        return RequestFailed(f"unexpected: {exc!r}")

    def routers(self) -> list[ConversationAffinityRouter]:
        """This process's routers for the deployment (one per handle Ray created)."""
        return [r for r in list(_ROUTERS) if r.deployment_id.app_name == self.app_name]

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for router in self.routers():
            found |= router.replica_stats()
        return found

    def describe(self) -> dict[str, Any]:
        hidden = ("replica", "fingerprint")
        return {**{k: v for k, v in self.info.items() if k not in hidden}, "backend": "ray"}

    def stats(self) -> dict[str, Any]:
        """The replicas' engine gauges as Ray Serve last collected them, summed (see :func:`sum_replica_stats`)."""
        return sum_replica_stats(self.replica_stats())

    async def problem(self) -> str | None:
        """Readiness: ``None`` while the application runs with at least one replica, else one line."""
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.app_name)
        if app is None:
            return "the Ray Serve application is not deployed"
        if str(getattr(app.status, "value", app.status)) != "RUNNING":
            return f"the Ray Serve application is {getattr(app.status, 'value', app.status)}"
        return None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            result = self._on_close()
            if asyncio.iscoroutine(result):
                await result
