"""Shared fixtures: the tiny reference-generated parity model and tiny demo weights.

Everything heavy is session-scoped and loaded lazily, so the whole ``tests/model`` +
``tests/parity`` suite loads each tiny model once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import model
from model.demo_weights import DemoWeights, write_demo_weights
from storage import Database, sqlite_url
from storage.tables import Base
from tests.pg import create_database, create_schema, truncate_tables

ROOT = Path(__file__).resolve().parents[1]

PARITY_DIR = ROOT / "tests" / "fixtures" / "parity"
DEMO_VARIANTS = ("vicuna0", "llama2", "minigptv2")


def _numeric_overrides(section: dict[str, Any]) -> dict[str, Any]:
    """The numeric keys of a config.json section, as a user would copy them into ``[model.vision]``."""
    return {k: v for k, v in section.items() if isinstance(v, int | float) and not isinstance(v, bool)}


@pytest.fixture(autouse=True)
def _no_root_handler_on_a_closed_stream() -> Any:
    """A test that runs the CLI in process (``configure_logging``: ``basicConfig(force=True)``) leaves the root
    logger writing to that run's captured stderr, closed once the run ends: every later record printed
    "--- Logging error --- … I/O operation on closed file" into the report.  Drop such handlers afterwards."""
    root = logging.getLogger()
    level = root.level
    yield
    for handler in list(root.handlers):
        if getattr(getattr(handler, "stream", None), "closed", False):
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return PARITY_DIR


@pytest.fixture(scope="session")
def parity_config() -> dict[str, Any]:
    return json.loads((PARITY_DIR / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def parity_expected() -> dict[str, Any]:
    return json.loads((PARITY_DIR / "expected" / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def parity_vision(parity_config: dict[str, Any]) -> dict[str, Any]:
    return _numeric_overrides(parity_config["vit"])


@pytest.fixture(scope="session")
def parity_qformer_dims(parity_config: dict[str, Any]) -> dict[str, Any]:
    return _numeric_overrides(parity_config["qformer"])


@pytest.fixture(scope="session")
def parity_model(parity_vision: dict[str, Any], parity_qformer_dims: dict[str, Any]) -> model.MiniGPT4:
    """Vicuna v0 layout on the public parity fixture (fp32, CPU)."""
    return model.load_minigpt4(
        variant="vicuna0",
        llm=PARITY_DIR / "llama",
        vit=PARITY_DIR / "eva_vit_g.pth",
        qformer=PARITY_DIR / "blip2_pretrained_flant5xxl.pth",
        projection=PARITY_DIR / "pretrained_minigpt4.pth",
        vision=parity_vision,
        qformer_dims=parity_qformer_dims,
    )


@pytest.fixture(scope="session")
def parity_llama2_model(parity_vision: dict[str, Any]) -> model.MiniGPT4:
    """LLaMA-2 layout (no Q-Former, 4-token grouping) on the same parity files."""
    return model.load_minigpt4(
        variant="llama2",
        llm=PARITY_DIR / "llama",
        vit=PARITY_DIR / "eva_vit_g.pth",
        qformer=None,
        projection=PARITY_DIR / "pretrained_minigpt4_llama2.pth",
        vision=parity_vision,
    )


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoWeights]:
    """Tiny random demo weights in the original layouts, one directory per variant."""
    return {v: write_demo_weights(tmp_path_factory.mktemp(f"demo-{v}"), v) for v in DEMO_VARIANTS}


class _DemoModels:
    """Loads each variant's demo weights once, on first use."""

    def __init__(self, weights: dict[str, DemoWeights]) -> None:
        self._weights = weights
        self._models: dict[str, model.MiniGPT4] = {}

    def __getitem__(self, variant: str) -> model.MiniGPT4:
        if variant not in self._models:
            self._models[variant] = model.load_minigpt4(**self._weights[variant].loader_kwargs())
        return self._models[variant]


@pytest.fixture(scope="session")
def demo_models(demo_dir: dict[str, DemoWeights]) -> _DemoModels:
    return _DemoModels(demo_dir)


@pytest.fixture(scope="session")
def postgres_url() -> Any:
    """A throwaway PostgreSQL cluster (``tests/pg.py``) for the session: the async URL of an empty database.

    Fails (never skips) when PostgreSQL is not installed: ``apt-get install postgresql``.
    """
    from tests.pg import PostgresCluster, PostgresUnavailable, create_database

    try:
        cluster = PostgresCluster.launch()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield create_database(cluster.url(), "minigpt4_test")
    finally:
        cluster.stop()


# ----------------------------------------------------------------------------- databases (SQLite and PostgreSQL)

DB_BACKENDS = ("sqlite", "postgres")
_db_numbers = itertools.count()


def _db_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{next(_db_numbers)}"


@pytest.fixture(scope="session")
def pg_schema_url(postgres_url: str) -> str:
    """A PostgreSQL database with the models' schema, emptied before each test that uses it."""
    url = create_database(postgres_url, _db_name("schema"))
    create_schema(url)
    return url


@pytest.fixture
def pg_url(pg_schema_url: str) -> str:
    """The PostgreSQL database with the models' schema, emptied (ids restart at 1)."""
    truncate_tables(pg_schema_url, [t.name for t in Base.metadata.sorted_tables])
    return pg_schema_url


@pytest.fixture(params=DB_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new database with the schema created from the models."""
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "test.db")
        create_schema(url)
        return url
    return request.getfixturevalue("pg_url")


@pytest.fixture
def run_db(db_url: str) -> Callable[[Callable[[Database], Awaitable[Any]]], Any]:
    """``run_db(async_fn)``: await ``async_fn(Database)`` in a fresh event loop, disposing the engine after
    (``run_db(async_fn, clock=…)``: ``Database``'s keyword arguments)."""

    def run(fn: Callable[[Database], Awaitable[Any]], **database: Any) -> Any:
        async def main() -> Any:
            async with Database(db_url, **database) as db:
                return await fn(db)

        return asyncio.run(main())

    return run
