"""The Ray backend's modules: replica, client and router each on its own, no import cycle among them, and one
model of the Ray settings (``[ray]``'s ``RaySettings``; the deployment's options are built from it)."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "model" / "engine"
RAY_MODULES = sorted(f"model.engine.{p.stem}" for p in ENGINE.glob("ray*.py"))


def _imports(path: Path) -> set[str]:
    """Every module the file imports, at any depth (functions and ``TYPE_CHECKING`` blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as a path, or ``[]``."""
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> list[str]:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                return [*path, name, nxt]
            if nxt not in state and (found := visit(nxt, [*path, name])):
                return found
        state[name] = 2
        return []

    for name in sorted(graph):
        if name not in state and (found := visit(name, [])):
            return found
    return []


def test_scale_ray_modules_have_no_import_cycle():
    assert {"model.engine.ray_client", "model.engine.ray_replica", "model.engine.ray_router"} <= set(RAY_MODULES)
    graph = {
        name: {other for other in RAY_MODULES if other != name and other in _imports(ENGINE / f"{name[13:]}.py")}
        for name in RAY_MODULES
    }
    assert _cycle(graph) == [], graph
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the check itself finds one


def test_scale_ray_modules_import_alone():
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed: pip install "minigpt4-bot[ray]"')
    for name in RAY_MODULES:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"


def test_scale_ray_settings_are_one_model():
    """The deployment's options are ``[ray]``'s values: no field of the table is declared again with a default of
    its own, and the table's defaults reach the deployment as they are (``max_ongoing_requests = 0`` → max_batch)."""
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed: pip install "minigpt4-bot[ray]"')
    from bot.cli.ray_backend import RaySettings, serve_options
    from bot.core.config import Settings
    from model.engine.ray_replica import ServeOptions

    table = set(RaySettings.model_fields) - {"address"}  # how this process joins the cluster, not the deployment's
    fields = {f.name: f for f in dataclasses.fields(ServeOptions)}
    assert table <= set(fields)
    assert [n for n in table if fields[n].default is not dataclasses.MISSING] == []

    settings = Settings.model_validate({"engine": {"max_batch": 6}})
    options = serve_options(settings)
    defaults = RaySettings()
    assert {n: getattr(options, n) for n in table} == {n: getattr(defaults, n) for n in table} | {
        "max_ongoing_requests": 6
    }
    chosen = Settings.model_validate({"ray": {"num_gpus": 0.5, "max_ongoing_requests": 3, "min_replicas": 0}})
    assert (serve_options(chosen).num_gpus, serve_options(chosen).max_ongoing_requests) == (0.5, 3)
    assert serve_options(chosen).min_replicas == 0
