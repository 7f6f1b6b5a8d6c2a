"""The composition root (``bot.cli.serve.run_bot``) and the plugin registry it starts front ends and backends from."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

import bot.cli.serve as serve
import bot.core.config as config
from bot.cli.backends import engine_config
from bot.core.backend_api import BackendPlugin
from bot.core.config import EngineSettings, Settings
from bot.core.frontend_api import Core, FrontEndContext, FrontEndPlugin, FrontEndSettings, FrontEndSetupError
from bot.core.plugins import BACKENDS, FRONTENDS, load_plugin, plugin_names
from bot.core.requests import Final, Request
from tests.scripted_backend import ScriptedBackend

T = TypeVar("T")


def test_installed_plugins_are_well_formed() -> None:
    assert {"web", "terminal", "slack"} <= set(plugin_names(FRONTENDS))
    for name in plugin_names(FRONTENDS):
        plugin = load_plugin(FRONTENDS, name)
        assert isinstance(plugin, FrontEndPlugin) and plugin.name == name
        assert issubclass(plugin.settings, FrontEndSettings) and Path(plugin.docs).name.endswith(".md")
        assert (Path(__file__).resolve().parents[1] / plugin.docs).is_file(), plugin.docs
    assert "local" in plugin_names(BACKENDS)
    assert isinstance(load_plugin(BACKENDS, "local"), BackendPlugin)


def test_engine_settings_reach_the_engine_by_name() -> None:
    """No field-by-field copy: every [engine] limit arrives in SchedulerConfig/EngineConfig with its value."""
    from model.engine import EngineConfig, SchedulerConfig

    values = {"max_batch": 7, "max_prefills_per_step": 3, "max_queue": 11, "max_queued_per_user": 2,
              "max_running_per_user": 1, "max_wait_s": 9.5, "kv_budget_tokens": 4096, "image_cache_size": 5,
              "prefix_reuse": False}  # fmt: skip
    built = engine_config(Settings.model_validate({"engine": values}))
    got = dataclasses.asdict(built.scheduler) | {k: getattr(built, k) for k in ("image_cache_size", "prefix_reuse")}
    assert {k: got[k] for k in values} == values
    engine_fields = {f.name for f in dataclasses.fields(SchedulerConfig)} | {
        f.name for f in dataclasses.fields(EngineConfig) if f.name != "scheduler"
    }
    served_elsewhere = {"backend", "request_timeout_s"}  # the backend's choice and its per-request deadline
    assert set(EngineSettings.model_fields) - served_elsewhere <= engine_fields


# ----------------------------------------------------------------------------- run_bot with test plugins


class ProbeSettings(FrontEndSettings):
    enabled: bool = True
    fail: str = ""
    question: str = "help"


@dataclasses.dataclass
class Probe:
    """A front end that asks one question on start, keeps the replies, then ends itself (or fails to start)."""

    name: str
    core: Core
    settings: ProbeSettings
    context: FrontEndContext
    replies: list[Any] = dataclasses.field(default_factory=list)
    stopped: bool = False
    leave: bool = True

    async def start(self) -> None:
        if self.settings.fail:
            raise FrontEndSetupError(self.settings.fail)
        self.replies = [
            e async for e in self.core.handle(Request(self.name, "W", "C", "t", "u", self.settings.question))
        ]
        if self.leave:
            asyncio.get_running_loop().call_soon(self.context.request_stop, self.name)

    async def stop(self) -> None:
        self.stopped = True

    async def problem(self) -> str | None:
        return None


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """Two probe front ends ("alpha" ends itself, "beta" keeps running) and a scripted backend, registered."""
    made: dict[str, Probe] = {}
    backend = ScriptedBackend()

    def create_for(name: str, leave: bool):
        def create(core: Core, settings: ProbeSettings, context: FrontEndContext) -> Probe:
            made[name] = Probe(name, core, settings, context, leave=leave)
            return made[name]

        return create

    plugins = {
        (FRONTENDS, "alpha"): FrontEndPlugin("alpha", ProbeSettings, create_for("alpha", True), docs="docs/alpha.md"),
        (FRONTENDS, "beta"): FrontEndPlugin("beta", ProbeSettings, create_for("beta", False), start_order=-1),
        (BACKENDS, "scripted"): BackendPlugin("scripted", lambda _settings, **_kw: _ready(backend)),
    }

    def names(group: str) -> tuple[str, ...]:
        return tuple(sorted(name for g, name in plugins if g == group))

    def load(group: str, name: str) -> Any:
        return plugins[(group, name)]

    for module in (serve, config):
        monkeypatch.setattr(module, "plugin_names", names)
        monkeypatch.setattr(module, "load_plugin", load)
    return {"made": made, "backend": backend, "data_dir": str(tmp_path / "data")}


async def _ready(backend: ScriptedBackend) -> ScriptedBackend:
    return backend


def _settings(probes: dict[str, Any], **tables: Any) -> Settings:
    return Settings.model_validate({"data_dir": probes["data_dir"], "engine": {"backend": "scripted"}, **tables})


async def _once_alpha_ended(
    probes: dict[str, Any], caplog: pytest.LogCaptureFixture, during: Callable[[asyncio.Task[int]], Awaitable[T]]
) -> tuple[T, int]:
    """Serve alpha (which ends at once) and beta; once alpha has ended, ``during(serve's task)``, then beta is
    stopped: what ``during`` returned, and serve's exit status."""
    task = asyncio.create_task(serve.run_bot(_settings(probes), terminal=False))
    while "alpha ended" not in caplog.text:
        await asyncio.sleep(0.01)
    value = await during(task)
    probes["made"]["beta"].context.request_stop("beta")
    return value, await asyncio.wait_for(task, 10)


def test_serve_starts_what_is_enabled_and_stops_when_the_last_front_end_ends(probes, caplog) -> None:
    caplog.set_level(logging.INFO)
    status = asyncio.run(serve.run_bot(_settings(probes, beta={"enabled": False}), terminal=False))
    made = probes["made"]
    assert status == 0 and set(made) == {"alpha"}  # beta's table disables it
    (reply,) = made["alpha"].replies
    assert isinstance(reply, Final) and reply.kind == "help"  # the request went through the real core
    assert made["alpha"].stopped and probes["backend"].closed


def test_a_front_end_that_leaves_does_not_stop_the_others(probes, caplog) -> None:
    caplog.set_level(logging.INFO)

    async def still_serving(task: asyncio.Task[int]) -> None:
        assert not task.done()  # beta still serves

    _, status = asyncio.run(_once_alpha_ended(probes, caplog, still_serving))
    assert status == 0
    assert "alpha ended; still serving beta" in caplog.text
    assert probes["made"]["alpha"].stopped and probes["made"]["beta"].stopped


def test_a_setup_error_stops_serve_with_one_line(probes, caplog) -> None:
    settings = _settings(probes, alpha={"fail": "ALPHA_TOKEN was rejected: set it in the environment"})
    assert asyncio.run(serve.run_bot(settings, terminal=False)) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["alpha: ALPHA_TOKEN was rejected: set it in the environment (see docs/alpha.md)"]
    assert probes["made"]["beta"].stopped  # started before alpha (start_order), stopped again
    assert probes["backend"].closed


def test_nothing_enabled_is_an_error(probes, caplog) -> None:
    settings = _settings(probes, alpha={"enabled": False}, beta={"enabled": False})
    assert asyncio.run(serve.run_bot(settings, terminal=False)) == 1
    assert "no front end enabled" in caplog.text and "[alpha], [beta]" in caplog.text


def test_serve_watches_each_started_front_end_for_readiness(probes, caplog) -> None:
    caplog.set_level(logging.INFO)

    async def readiness(_task: asyncio.Task[int]) -> Any:
        return await probes["made"]["beta"].core.readiness()  # the real core, on the real database

    ready, _ = asyncio.run(_once_alpha_ended(probes, caplog, readiness))
    assert ready.ok and ready.checks == {"database": "ok", "engine": "ok", "beta": "ok", "alpha": "ok"}
