"""What the engine does to a CPU host before its first step: a weight layout for the fast GEMM path, and malloc.

Both were found by profiling the engine on the 2-core benchmark machine (issue 27, docs/benchmarks.md).

* :func:`lay_out_for_cpu` — every ``nn.Linear`` weight ``[out, in]`` is stored as the transpose of a
  contiguous ``[in, out]`` tensor: the **same values** and shape, other strides.  ``F.linear`` then hands
  MKL a plain ``x @ W`` instead of ``x @ Wᵀ``, which MKL's sgemm runs markedly faster on this kind of
  host: the LLaMA head ``[16, 256] × [256, 32000]`` in 6.8 ms instead of 9.3 ms, a 16-row prefill of
  150 tokens 23 % faster.  vLLM's CPU backend likewise prepacks its linear weights once at load.  Sums
  are then taken in another order, so logits move in the last bits (≈1e-6 on the tiny models); greedy
  ids and the parity tests are unaffected.  Not done on GPUs, where cuBLAS runs both layouts alike.
* :func:`keep_freed_memory` — glibc's malloc gives each large block (above a threshold that starts at
  128 KiB) its own ``mmap`` and returns freed heap to the system, so the engine's per-step tensors (the
  logits, the KV cache as rows join and leave, activations) came back as fresh pages, each page-faulted
  and zeroed again: ~65,000 page faults and ≈12 % of a 16-conversation cell.  Raising the mmap and trim
  thresholds makes malloc reuse freed memory instead.  The cost: the process keeps its peak heap after
  a burst instead of shrinking back (it is reused for the next one).  Linux with glibc only; process-wide.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

import torch

__all__ = ["keep_freed_memory", "lay_out_for_cpu"]

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): blocks above it still get their own mmap.
_MMAP_THRESHOLD = 32 * 2**20
_TRIM_THRESHOLD = 2**30  # freed heap kept for reuse, up to 1 GiB above what is in use

_kept = False


def lay_out_for_cpu(module: torch.nn.Module) -> int:
    """Store every ``nn.Linear`` weight of ``module`` as a transposed contiguous tensor; returns how many changed.

    Idempotent (a weight already laid out is left alone) and safe while another thread runs the module:
    its ops in flight keep the old tensor.  Done one weight at a time, so the extra memory is one weight.
    """
    changed = 0
    with torch.no_grad():
        for sub in module.modules():
            if not isinstance(sub, torch.nn.Linear) or sub.weight.device.type != "cpu":
                continue
            weight = sub.weight
            if weight.dim() != 2 or weight.t().is_contiguous():
                continue
            weight.data = weight.data.t().contiguous().t()
            changed += 1
    return changed


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory (see the module docstring); ``False`` where that is not glibc."""
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
        log.debug("mallopt refused the thresholds; malloc keeps its defaults")
        return False
    _kept = True
    return True
