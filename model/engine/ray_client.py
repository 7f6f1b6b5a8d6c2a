"""The caller's side of the Ray Serve backend: :class:`RayServeBackend` over a ``DeploymentHandle``.

:class:`RayServeBackend`
    The core's backend seam (``stream`` / ``describe`` / ``stats`` / ``close``) over a ``DeploymentHandle`` to
    the :class:`~model.engine.ray_replica.EngineReplica` deployment.  Ray's failures become the contract's
    errors: ``BackPressureError`` (the caller's queue of ``max_queued_requests`` is full) →
    :class:`~model.engine.contract.Busy`; a replica that died or is unreachable, or any other Ray error →
    :class:`~model.engine.contract.RequestFailed`.  Closing the stream early (the user left, a timeout) cancels the
    Ray request, which cancels the replica's generator and so aborts the engine request.

:class:`RemoteError`
    The wire form of the contract's errors.  They do not survive pickling (their ``args`` are the formatted
    message), so a replica *yields* a :class:`RemoteError` in their place and this side raises the original
    type again: a ``RequestRejected("image", …, image_index=1)`` raised in the replica arrives as exactly that.

:func:`register_router` / :meth:`RayServeBackend.stats`
    The routers Ray creates in this process (:mod:`model.engine.ray_router`, pickled by value) register here,
    so that the backend reads the replicas' engine gauges they collect.

The three Ray modules: ``ray_replica`` (the deployment) imports ``ray_router`` and this one; ``ray_router``
imports this one at run time; this one imports neither.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.request_router import RequestRouter

from model.engine.contract import (
    Busy,
    EngineError,
    FinalEvent,
    RequestFailed,
    RequestRejected,
    RequestTooLarge,
    StreamArgs,
    TokenEvent,
    stream_method,
)

__all__ = ["BUSY_RETRY_AFTER_S", "RayServeBackend", "RemoteError", "register_router", "sum_replica_stats"]

log = logging.getLogger(__name__)

BUSY_RETRY_AFTER_S = 5.0
"""What :class:`~model.engine.contract.Busy` says when Ray Serve's caller-side queue is full (a guess: one
short answer)."""


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


# ----------------------------------------------------------------------------- the routers of this process


_ROUTERS: weakref.WeakSet[RequestRouter] = weakref.WeakSet()


def register_router(router: RequestRouter) -> None:
    """Called by each :class:`~model.engine.ray_router.ConversationAffinityRouter` this process creates (Ray
    pickles the router's module by value, so the registry must live in a module imported by reference: this
    one, which the router imports at run time and which imports no router)."""
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


# ----------------------------------------------------------------------------- the backend


def _cancel(response: Any) -> None:
    """Cancel a Ray Serve request: before it reached a replica, its routing; after, the replica's generator
    (a ``CancelledError`` there closes the engine stream, which aborts the engine request).  Ray re-raises
    the request's own failure here (a ``BackPressureError``…): that was reported already."""
    try:
        response.cancel()
    except (Exception, asyncio.CancelledError) as exc:  # cancelled before it reached a replica
        log.debug("ray backend: cancelling a request that had ended: %r", exc)


class RayServeBackend:
    """The backend seam over a ``DeploymentHandle`` to :class:`~model.engine.ray_replica.EngineReplica` replicas.

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

    @stream_method
    async def stream(self, args: StreamArgs) -> AsyncIterator[TokenEvent | FinalEvent]:
        """One answer from a replica (chosen by the conversation-affinity router); see the module docstring."""
        if self._closed:
            raise RequestFailed("the Ray Serve backend is closed")
        conversation_id = args["conversation_id"]
        handle = self.handle.options(stream=True, method_name="stream", session_id=conversation_id)
        try:  # plain lists and dicts: what Ray pickles to the replica
            response = handle.remote(**(args | {"turns": list(args["turns"]), "images": list(args["images"]),
                                                "options": dict(args["options"])}))  # fmt: skip
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

    def routers(self) -> list[Any]:
        """This process's routers for the deployment (one per handle Ray created): each a
        :class:`~model.engine.ray_router.ConversationAffinityRouter`, found through :func:`register_router`."""
        ids = [(r, getattr(r, "deployment_id", None)) for r in list(_ROUTERS)]  # ours have the property
        return [r for r, d in ids if d is not None and d.app_name == self.app_name]

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
