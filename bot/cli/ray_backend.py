"""The Ray Serve generation backend (entry point ``ray``): ``[engine] backend = "ray"`` plus ``[ray]``.

It builds the engine's Ray Serve application (:mod:`model.engine.ray_replica`) from the settings, deploys
it — or attaches to the one another bot process already deployed with the same settings — and returns
a :class:`~model.engine.ray_client.RayServeBackend` over its ``DeploymentHandle``.  :class:`RaySettings` is
the one model of the Ray settings: the deployment gets it as a :class:`~model.engine.ray_replica.ServeOptions`
built from ``model_dump()`` (:func:`serve_options`).  Ray is imported only here, when this backend is chosen:
the ``local`` backend needs no Ray installed (``pip install "minigpt4-bot[ray]"`` adds it).
Operator guidance: docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, cast

from pydantic import Field, field_validator, model_validator

from bot.cli.backends import demo_weights_in_use, engine_config
from bot.core.backend_api import BackendPlugin, BackendSettings, GenerationBackend
from bot.core.config import Settings

if TYPE_CHECKING:
    from model.engine.ray_replica import ReplicaSpec, ServeOptions

__all__ = [
    "INSTALL_HINT",
    "RAY",
    "RaySettings",
    "RaySetupError",
    "deployment_options",
    "ray_settings",
    "replica_spec",
    "serve_options",
]

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "minigpt4-bot[ray]"'
NAMESPACE = "minigpt4-bot"


class RaySettings(BackendSettings):
    """``[ray]``: the engine as Ray Serve replicas, used when ``[engine] backend = "ray"`` (the ``ray`` extra).

    Each replica runs one engine with the ``[engine]`` limits; ``max_ongoing_requests`` is the replica's
    slot count (0 = ``[engine] max_batch``).  ``max_replicas`` > 0 turns on Ray Serve autoscaling between
    ``min_replicas`` and ``max_replicas`` (``replicas`` is then the initial count).
    """

    address: str = Field(
        "", description='"" = start a local Ray; "auto" or "HOST:6379" = a cluster this machine is a node of'
    )
    app_name: str = Field("minigpt4", min_length=1)
    replicas: int = Field(1, ge=1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(0, ge=0)
    target_ongoing_requests: float = Field(8.0, gt=0)
    num_gpus: float = Field(1.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    max_ongoing_requests: int = Field(0, ge=0)
    max_queued_requests: int = Field(64, ge=-1)
    affinity: bool = True

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if value.strip().startswith("ray://"):
            raise ValueError(
                "Ray Client (ray://) cannot stream from Ray Serve: make this machine a node of the cluster "
                '(ray start --address=HEAD:6379 --num-cpus=0 --num-gpus=0) and set address = "auto"'
            )
        return value.strip()

    @model_validator(mode="after")
    def _autoscaling_range(self) -> RaySettings:
        if self.max_replicas and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


def ray_settings(settings: Settings) -> RaySettings:
    """The validated ``[ray]`` table (its defaults when absent)."""
    return cast(RaySettings, settings.backend("ray"))


class RaySetupError(RuntimeError):
    """The Ray backend cannot start; the message says what to change, in one line."""


def replica_spec(settings: Settings) -> ReplicaSpec:
    """What every replica builds: the ``[model]`` weights (or demo weights), the ``[engine]`` limits."""
    from model.engine.ray_replica import ReplicaSpec

    demo = settings.model.variant if settings.model.uses_demo_weights else None
    return ReplicaSpec(
        loader_kwargs=settings.model.loader_kwargs(),
        engine=engine_config(settings),
        demo=demo,
        timeout_s=settings.engine.request_timeout_s,
        info={"demo": demo_weights_in_use(settings)},
    )


def serve_options(settings: Settings) -> ServeOptions:
    """The ``[ray]`` table as deployment options (``max_ongoing_requests = 0`` → ``[engine] max_batch``)."""
    return deployment_options(ray_settings(settings), max_batch=settings.engine.max_batch)


def deployment_options(ray: RaySettings, *, max_batch: int) -> ServeOptions:
    """``ray.model_dump()`` as the deployment's options: every field and default is the table's; ``address`` is
    this process's way to the cluster (not the deployment's, so a bot joining by another address attaches)."""
    from model.engine.ray_replica import ServeOptions

    values = ray.model_dump(exclude={"address"})
    values["max_ongoing_requests"] = ray.max_ongoing_requests or max_batch
    return ServeOptions(**values)


def _connect(settings: Settings) -> bool:
    """Join (or start) Ray and start Serve without its HTTP proxy; True when this process started Ray."""
    import ray
    from ray import serve

    started = False
    if not ray.is_initialized():
        address = ray_settings(settings).address or None
        kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": settings.log_level == "DEBUG"}
        if address is None:
            kwargs["include_dashboard"] = False
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError) as exc:
            raise RaySetupError(f"cannot reach the Ray cluster at [ray] address = {address!r}: {exc}") from exc
        started = address is None
    serve.start(proxy_location="Disabled")  # the bot talks to replicas through handles only
    return started


def _check_resources(options: ServeOptions) -> None:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if options.num_gpus > 0 and gpus == 0 and options.max_replicas == 0:
        raise RaySetupError(
            f"[ray] num_gpus = {options.num_gpus:g} but the Ray cluster has no GPU: "
            "set [ray] num_gpus = 0 to run the replicas on CPU, or add GPU nodes"
        )


def _deploy(spec: ReplicaSpec, options: ServeOptions) -> tuple[Any, dict[str, Any]]:
    """A handle to the application and one replica's ``describe()``: the running application when it was
    deployed with the same settings (another bot process), else a fresh deployment."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from model.engine.ray_replica import build_app

    fingerprint = spec.fingerprint(options)
    app = serve.status().applications.get(options.app_name)
    if app is not None and str(getattr(app.status, "value", app.status)) == "RUNNING":
        try:
            handle = serve.get_app_handle(options.app_name)
            info = handle.describe.remote().result(timeout_s=60)
            if info.get("fingerprint") == fingerprint:
                log.info("ray: using the running Serve application %r (same settings)", options.app_name)
                return handle, info
            log.warning("ray: the running Serve application %r has other settings: redeploying it", options.app_name)
        except (RayServeException, TimeoutError, AttributeError) as exc:
            log.warning("ray: the running Serve application %r did not answer (%r): redeploying it",
                        options.app_name, exc)  # fmt: skip
    try:
        handle = serve.run(build_app(spec, options), name=options.app_name, route_prefix=None)
    except RuntimeError as exc:  # Serve gave up (weights that do not load …): say why, in the replica's words
        raise RaySetupError(f"the engine replicas did not start: {_replica_error(options) or exc}") from exc
    return handle, handle.describe.remote().result(timeout_s=60)


def _replica_error(options: ServeOptions) -> str:
    """The last line of the deployment's status message: the exception a replica's constructor raised."""
    from ray import serve

    try:
        app = serve.status().applications[options.app_name]
        message = app.deployments[options.deployment_name].message
    except Exception:  # the status itself is unavailable: the caller reports Serve's own error
        return ""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else ""


async def _create_ray(settings: Settings, **_ignored: Any) -> GenerationBackend:
    try:
        import ray  # noqa: F401 - only to fail early, with the fix
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise RaySetupError(f'[engine] backend = "ray" needs Ray Serve: {INSTALL_HINT}') from exc
    from model.engine.ray_client import RayServeBackend

    spec, options = replica_spec(settings), serve_options(settings)
    started = await asyncio.to_thread(_connect, settings)
    try:
        await asyncio.to_thread(_check_resources, options)
        handle, info = await asyncio.to_thread(_deploy, spec, options)
    except BaseException:
        if started:
            await asyncio.to_thread(_shutdown)
        raise
    scaling = (
        f"{options.min_replicas}-{options.max_replicas} replicas (autoscaling)"
        if options.max_replicas
        else f"{options.replicas} replica{'s' if options.replicas != 1 else ''}"
    )
    log.info(
        "ray: %s of %r, %g GPU + %g CPU each, %d answers at once per replica, affinity %s",
        scaling, options.app_name, options.num_gpus, options.num_cpus, options.max_ongoing_requests,
        "on" if options.affinity else "off",
    )  # fmt: skip

    async def close() -> None:
        if started:  # a Ray this process started ends with it; a shared cluster keeps serving the others
            await asyncio.to_thread(_shutdown)

    return RayServeBackend(handle, info=info, app_name=options.app_name, on_close=close)


def _shutdown() -> None:
    """End the Ray this process started: its replicas go with it (``serve.shutdown()`` first would wait up to
    30 s for Serve's controller, past a container's usual grace period)."""
    import ray

    ray.shutdown()


RAY = BackendPlugin(name="ray", create=_create_ray, settings=RaySettings)
