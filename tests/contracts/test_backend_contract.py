"""The backend contract (``tests/contracts/backend_contract.py``) on the local backend: ``EngineBackend`` over
one engine on the tiny demo weights, started once for the module.  Ray runs the same class in
``tests/scale/test_scale_ray.py``, vLLM in ``tests/vllm/test_backend.py``, on the engines those modules start."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest

from model.engine import Engine, EngineBackend, EngineConfig, SchedulerConfig
from tests.contracts.backend_contract import BackendContract, BackendDriver


def _run(coro: Awaitable[Any]) -> Any:
    async def outer() -> Any:
        return await asyncio.wait_for(coro, 60.0)

    return asyncio.run(outer())


class TestLocalBackend(BackendContract):
    @pytest.fixture(scope="class")
    def driver(self, demo_models: Any) -> Iterator[BackendDriver]:
        # One request at a time: the request after a closed one is answered only if the slot was freed.
        config = EngineConfig(scheduler=SchedulerConfig(max_batch=1, max_queue=1))
        backend = EngineBackend(Engine(demo_models["vicuna0"], config).start())

        async def idle() -> bool:
            stats = backend.stats()
            return stats["batch_size"] == 0 and stats["queue_depth"] == 0

        yield BackendDriver(backend, _run, idle)
        _run(backend.close())
