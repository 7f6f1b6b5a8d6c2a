"""The engine's CPU thread settings follow ``[engine] threads`` and the cores the process may use (issue 27)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import user

from model.engine import Engine, EngineConfig, EngineRequest
from model.engine.threads import cgroup_cpu_limit, thread_settings, usable_cores
from model.generate import default_options
from model.image_processing import builtin_test_image

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("threads", "cores", "intra", "source"), [
    (0, 1, 1, "derived"), (0, 2, 1, "derived"), (0, 8, 7, "derived"), (3, 2, 3, "[engine] threads"),
    (1, 16, 1, "[engine] threads"),
])  # fmt: skip
def test_thread_settings_follow_the_setting_and_the_usable_cores(threads, cores, intra, source) -> None:
    settings = thread_settings(threads, cores)
    assert (settings.intra_op, settings.inter_op, settings.usable_cores, settings.source) == (intra, 1, cores, source)
    assert f"{intra} intra-op" in settings.describe()


def test_negative_threads_are_refused() -> None:
    with pytest.raises(ValueError, match="threads"):
        thread_settings(-1, 2)


@pytest.mark.parametrize(("affinity", "quota", "cores"), [
    (4, math.inf, 4), (4, 1.5, 1), (4, 2.0, 2), (2, 8.0, 2), (4, 0.5, 1), (0, math.inf, 1),
])  # fmt: skip
def test_usable_cores_is_the_affinity_mask_capped_by_the_cpu_quota(affinity, quota, cores) -> None:
    assert usable_cores(affinity, quota) == cores


def test_cgroup_quota_is_read_from_v2_then_v1(tmp_path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    assert cgroup_cpu_limit(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_a_restricted_affinity_mask_gives_one_usable_core() -> None:
    """A process pinned to one core (taskset, a cpuset) derives one core and one thread."""
    code = (
        "import json, os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        "from model.engine.threads import thread_settings, usable_cores;"
        "s = thread_settings(0); print(json.dumps([usable_cores(), s.intra_op, s.inter_op]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [1, 1, 1]


@pytest.mark.parametrize("threads", [0, 2])
def test_the_engine_worker_runs_with_its_settings(m, threads) -> None:
    """Applied in the worker thread itself: torch's count is per thread once a thread has run an op."""
    seen: list[int] = []
    engine = Engine(m, EngineConfig(threads=threads))
    prefill = engine.runner.prefill

    def recording_prefill(seq):
        seen.append(torch.get_num_threads())
        return prefill(seq)

    engine.runner.prefill = recording_prefill  # type: ignore[method-assign]
    expected = thread_settings(threads)

    async def main() -> None:
        async with engine:
            assert engine.threads == expected
            opts = default_options(m, do_sample=False, max_new_tokens=2)
            await engine.generate(EngineRequest(turns=[user("hi")], images=[builtin_test_image(224)], options=opts))

    asyncio.run(main())
    assert seen == [expected.intra_op]
