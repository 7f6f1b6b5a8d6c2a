"""One engine on the tiny demo weights for every Slack test (started once, stopped at the end)."""

from __future__ import annotations

from typing import Any

import pytest

from model.engine import Engine
from model.engine.local_backend import EngineBackend


@pytest.fixture(scope="session")
def slack_engine(demo_models: Any) -> Any:
    engine = Engine(demo_models["vicuna0"]).start()
    yield engine
    engine.stop()


@pytest.fixture
def demo_backend(slack_engine: Engine) -> EngineBackend:
    return EngineBackend(slack_engine, info={"demo": True})
