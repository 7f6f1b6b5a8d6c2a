"""How many CPU threads the engine's tensor work uses, chosen from the cores this process may really use.

Why this matters (issue 27): torch's intra-op pool (OpenMP) splits every op of a decode step across
its threads and waits at a barrier after each.  When the pool has as many threads as the machine has
cores and another process — the bot's own event loop, its web server, a database driver, a
neighbour — takes one core, every barrier waits for a descheduled thread: on a 2-core host a batched
decode step became 3–5× slower and the engine fell below the one-request-at-a-time reference.  So
the derived default leaves one usable core to everything else (``usable − 1``, at least 1).

* :func:`usable_cores` — the CPU affinity mask (``os.sched_getaffinity``: taskset, cpusets) capped by
  the cgroup CPU quota (containers: ``cpu.max`` in v2, ``cpu.cfs_quota_us`` in v1), which neither
  torch nor OpenMP look at.
* :func:`thread_settings` — ``[engine] threads`` (``0`` = derived) → :class:`ThreadSettings`.
* :func:`apply_thread_settings` — sets them **in the calling thread**: with the OpenMP backend
  torch's thread count is per thread once a thread has run an op (a later ``torch.set_num_threads``
  in another thread does not reach it), so the engine calls this first thing in its worker thread.

``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` are read by libgomp only when torch is loaded, so they
cannot be changed here; with one intra-op thread there is no barrier to spin at.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ThreadSettings", "apply_thread_settings", "cgroup_cpu_limit", "thread_settings", "usable_cores"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadSettings:
    """Threads for torch's intra-op and inter-op pools, and where the numbers came from."""

    intra_op: int
    inter_op: int
    usable_cores: int
    source: str  # "[engine] threads" or "derived"

    def describe(self) -> str:
        """The start-up log line's text."""
        how = "set by [engine] threads" if self.source == "[engine] threads" else "derived: usable cores - 1"
        return (
            f"{self.intra_op} intra-op / {self.inter_op} inter-op thread(s) ({how}; {self.usable_cores} usable core(s))"
        )


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """The cgroup CPU quota in cores (``cpu.max`` v2, else ``cpu/cpu.cfs_quota_us`` v1), ``None`` if unlimited."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cores(affinity: int | None = None, quota: float | None = None) -> int:
    """Cores this process may run on: the affinity mask's size, capped by a CPU quota (floored, at least 1).

    A quota of 1.5 cores counts as 1: a second busy thread would be throttled and stall the barrier.
    Without arguments both are read from the running process.
    """
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not on Linux
            affinity = os.cpu_count() or 1
    if quota is None:
        quota = cgroup_cpu_limit()
    cores = max(1, affinity)
    if quota is not None and 0 < quota < cores:
        cores = max(1, math.floor(quota))
    return cores


def thread_settings(threads: int = 0, cores: int | None = None) -> ThreadSettings:
    """``threads`` from ``[engine]`` (``0``: derived from ``cores``, default :func:`usable_cores`).

    Derived: one core is left to the event loop and the host's other programs (see the module
    docstring), so ``max(1, cores - 1)``.  The engine does its tensor work on one worker thread,
    so torch's inter-op pool gets one thread.
    """
    if threads < 0:
        raise ValueError(f"[engine] threads must be 0 (derived) or a positive count, got {threads}")
    cores = usable_cores() if cores is None else max(1, cores)
    if threads:
        return ThreadSettings(threads, 1, cores, "[engine] threads")
    return ThreadSettings(max(1, cores - 1), 1, cores, "derived")


def apply_thread_settings(settings: ThreadSettings) -> None:
    """Apply ``settings`` to torch in the calling thread (see the module docstring for why it is per thread).

    The inter-op pool can only be sized before its first use in the process; a later engine in the
    same process keeps the first size (logged at debug level).
    """
    import torch

    torch.set_num_threads(settings.intra_op)
    if torch.get_num_interop_threads() != settings.inter_op:
        try:
            torch.set_num_interop_threads(settings.inter_op)
        except RuntimeError as exc:  # already started in this process
            log.debug("inter-op threads stay at %d: %s", torch.get_num_interop_threads(), exc)
