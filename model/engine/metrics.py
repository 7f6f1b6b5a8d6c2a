"""Engine counters and recent latencies, for logs, benchmarks and the Prometheus exporter."""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EngineMetrics"]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class EngineMetrics:
    """Cumulative counters plus bounded windows of recent measurements."""

    submitted: int = 0
    finished: int = 0
    rejected_busy: int = 0
    tokens: int = 0
    steps: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    ttft_first: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    ttft_follow_up: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))
    _token_times: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))

    def record_ttft(self, seconds: float, follow_up: bool) -> None:
        (self.ttft_follow_up if follow_up else self.ttft_first).append(seconds)

    def record_step(self, batch_size: int, seconds: float) -> None:
        self.steps += 1
        self.batch_sizes.append(batch_size)
        self._token_times.append((time.monotonic(), batch_size))

    def record_finish(self, final: Any) -> None:
        self.finished += 1
        self.finish_reasons[final.finish_reason] = self.finish_reasons.get(final.finish_reason, 0) + 1

    def tokens_per_second(self, window_s: float = 10.0) -> float:
        """Decode throughput over the last ``window_s`` seconds (one token per row per step)."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self._token_times if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        span = recent[-1][0] - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0

    def snapshot(self, **live: Any) -> dict[str, Any]:
        image_hits, image_misses = live.pop("image_cache", (0, 0))
        prefix_hits, prefix_misses = live.pop("prefix_cache", (0, 0))
        return {
            **live,
            "submitted": self.submitted,
            "finished": self.finished,
            "rejected_busy": self.rejected_busy,
            "generated_tokens": self.tokens,
            "tokens_per_s": self.tokens_per_second(),
            "mean_batch_size": statistics.fmean(self.batch_sizes) if self.batch_sizes else 0.0,
            "ttft_first_p50_s": _percentile(list(self.ttft_first), 0.5),
            "ttft_follow_up_p50_s": _percentile(list(self.ttft_follow_up), 0.5),
            "image_cache_hit_rate": image_hits / max(1, image_hits + image_misses),
            "prefix_cache_hit_rate": prefix_hits / max(1, prefix_hits + prefix_misses),
            "finish_reasons": dict(self.finish_reasons),
        }
