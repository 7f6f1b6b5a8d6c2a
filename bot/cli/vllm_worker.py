"""The vLLM worker from the bot's side: ``[vllm]`` (its settings table), the worker process this bot starts and
stops (``.venv-vllm/bin/python -m model.vllm_plugin.worker``), the model folder it serves and the health check
of one it did not start.  :mod:`bot.cli.vllm_backend` talks to it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, field_validator

from bot.core.backend_api import BackendSettings
from bot.core.config import Settings

__all__ = ["VllmSettings", "VllmSetupError", "WorkerProcess", "vllm_settings"]

log = logging.getLogger("bot.cli.vllm_backend")  # one logger for the vllm backend, whichever module logs

ROOT = Path(__file__).resolve().parents[2]


class VllmSettings(BackendSettings):
    """``[vllm]``: where the vLLM worker runs and how it is sized (used when ``[engine] backend = "vllm"``)."""

    url: str = Field(
        "", description='"" = start a worker (and stop it at exit); "http://HOST:PORT" = use a running one'
    )
    python: str = Field(
        ".venv-vllm/bin/python", description="the vLLM environment's python (relative: to the repository)"
    )
    port: int = Field(0, ge=0, le=65535, description="the started worker's loopback port; 0 = a free one")
    model_dir: str = Field("", description='exported model folder (minigpt4-bot weights export); "" = export [model]')
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_num_seqs: int = Field(16, ge=1, le=1024)
    max_model_len: int = Field(0, ge=0, description="0 = the model's own")
    limit_mm_per_prompt: int = Field(
        4,
        ge=1,
        le=64,
        description="pictures one prompt (a whole thread) may hold; vLLM sizes its start-up "
        "profiling and encoder cache for this many, so keep it small",
    )
    kv_cache_gib: float = Field(2.0, gt=0)
    threads: int = Field(0, ge=0, description="CPU: threads of vLLM's worker; 0 = vLLM's choice (reserves one core)")
    enforce_eager: bool = False
    prefix_caching: bool = Field(True, description="false = every turn re-prefills its whole thread (measurements)")
    block_size: int = Field(
        0,
        ge=0,
        le=256,
        description="KV-cache block in tokens; 0 = vLLM's (16 on CUDA, 128 on CPU). The prefix cache reuses whole "
        "blocks only, so smaller blocks reuse more of a follow-up's thread; the CPU kernel needs a multiple of 32",
    )
    max_wait_s: float = Field(30.0, gt=0, description="Busy when no first token comes within this time")
    start_timeout_s: float = Field(600.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("use http://HOST:PORT (or empty to start a worker)")
        return value


def vllm_settings(settings: Settings) -> VllmSettings:
    return cast(VllmSettings, settings.backend("vllm"))


class VllmSetupError(RuntimeError):
    """The vLLM backend cannot start; the message says what to change, in one line."""


class WorkerProcess:
    """The worker this bot process started: ``.venv-vllm/bin/python -m model.vllm_plugin.worker``."""

    def __init__(self, settings: Settings, model_dir: Path) -> None:
        self.settings, self.vllm, self.model_dir = settings, vllm_settings(settings), model_dir
        self.port = self.vllm.port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(settings.data_dir) / "logs" / "vllm-worker.log"
        self.process: asyncio.subprocess.Process | None = None
        self.starting = False

    @property
    def python(self) -> Path:
        path = Path(self.vllm.python).expanduser()
        return path if path.is_absolute() else ROOT / path

    @property
    def exited(self) -> bool:
        return self.process is not None and self.process.returncode is not None and not self.starting

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    def command(self) -> list[str]:
        v = self.vllm
        cmd = [str(self.python), "-m", "model.vllm_plugin.worker", "--model", str(self.model_dir),
               "--port", str(self.port), "--dtype", _dtype(self.settings), "--max-num-seqs", str(v.max_num_seqs),
               "--max-model-len", str(v.max_model_len), "--kv-cache-gib", str(v.kv_cache_gib),
               "--threads", str(v.threads), "--limit-images", str(v.limit_mm_per_prompt)]  # fmt: skip
        cmd += ["--enforce-eager"] if v.enforce_eager else []
        cmd += ["--block-size", str(v.block_size)] if v.block_size else []
        return cmd + ([] if v.prefix_caching else ["--no-prefix-caching"])

    async def start(self) -> dict[str, Any]:
        """Start the worker and wait until its engine answers ``/health``; returns its facts."""
        import aiohttp

        if not self.python.is_file():
            raise VllmSetupError(
                f"no vLLM environment at {self.python}: run ./scripts/setup.sh --vllm (or set [vllm] url)"
            )
        self.starting = True
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            with self.log_path.open("ab") as out:
                self.process = await asyncio.create_subprocess_exec(
                    *self.command(), stdout=out, stderr=out, cwd=str(ROOT), env=env, start_new_session=True
                )
            log.info("vllm: starting the worker (pid %d, log %s)", self.process.pid, self.log_path)
            deadline = time.monotonic() + self.vllm.start_timeout_s
            async with aiohttp.ClientSession() as session:
                while time.monotonic() < deadline:
                    if self.process.returncode is not None:
                        raise VllmSetupError(f"the vLLM worker exited during start-up: {_last_line(self.log_path)}")
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                            if r.status == 200:
                                facts = cast(dict[str, Any], await r.json())
                                log.info("vllm: worker ready at %s (%s)", self.url, facts.get("model"))
                                return facts
                    await asyncio.sleep(0.5)
            await self.stop()
            raise VllmSetupError(f"the vLLM worker did not start within {self.vllm.start_timeout_s:g} s")
        finally:
            self.starting = False

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s (its engine-core children are in its process group)."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            await process.wait()


def _dtype(settings: Settings) -> str:
    dtype = vllm_settings(settings).dtype
    if dtype != "auto":
        return dtype
    return settings.model.dtype if settings.model.dtype != "auto" else "auto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _last_line(path: Path) -> str:
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def _model_dir(settings: Settings) -> Path:
    """``[vllm] model_dir``, or ``[model]`` (demo weights included) exported once under ``data_dir``."""
    configured = vllm_settings(settings).model_dir
    if configured:
        path = Path(configured).expanduser()
        if not (path / "config.json").is_file():
            raise VllmSetupError(
                f"[vllm] model_dir = {configured!r} has no config.json: minigpt4-bot weights export --out DIR"
            )
        return path
    out = Path(settings.data_dir) / "vllm-model" / settings.model.variant
    if not (out / "config.json").is_file():
        _export(settings, out)
    return out


def _export(settings: Settings, out: Path) -> None:
    """Export ``[model]`` for vLLM (``minigpt4-bot weights export``'s function)."""
    try:
        from model.vllm_plugin.export import export_model
    except ImportError as exc:
        raise VllmSetupError(
            f"[vllm] model_dir is empty and the export is unavailable ({exc}): "
            "run minigpt4-bot weights export --out DIR and set [vllm] model_dir"
        ) from exc
    kwargs = settings.model.loader_kwargs()
    if settings.model.uses_demo_weights:
        from model.demo_weights import write_demo_weights

        kwargs |= write_demo_weights(settings.demo_weights_dir, settings.model.variant).loader_kwargs()
    log.info("vllm: exporting [model] for vLLM into %s", out)
    export_model(out=out, **kwargs)


async def _health(url: str) -> dict[str, Any]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{url}/health", timeout=timeout) as r:
            if r.status == 200:
                return cast(dict[str, Any], await r.json())
            raise VllmSetupError(f"the vLLM worker at [vllm] url = {url!r} is not ready (HTTP {r.status})")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise VllmSetupError(f"cannot reach the vLLM worker at [vllm] url = {url!r}: {exc!r}") from exc
