"""Prometheus metrics of the bot (requests, latency, tokens, quota rejections) and the engine gauges."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["BotMetrics"]


class BotMetrics:
    """One registry per service, so tests and several services in one process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "minigpt4_requests", "Messages handled, by platform and outcome", ["platform", "outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "minigpt4_answer_seconds", "Time from message to final answer", ["platform"], registry=self.registry,
            buckets=(0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
        )  # fmt: skip
        self.ttft = Histogram(
            "minigpt4_time_to_first_token_seconds", "Time to the first streamed token", ["platform"],
            registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30),
        )  # fmt: skip
        self.tokens = Counter("minigpt4_generated_tokens", "Tokens generated", ["platform"], registry=self.registry)
        self.quota_rejections = Counter(
            "minigpt4_quota_rejections", "Requests refused by a quota", ["scope", "limit"], registry=self.registry
        )
        self.queue_depth = Gauge("minigpt4_engine_queue_depth", "Questions waiting", registry=self.registry)
        self.batch_size = Gauge("minigpt4_engine_batch_size", "Rows in the running batch", registry=self.registry)
        self.tokens_per_s = Gauge("minigpt4_engine_tokens_per_second", "Recent decode rate", registry=self.registry)
        self.cache_hit = Gauge(
            "minigpt4_engine_cache_hit_rate", "Reuse cache hit rates", ["cache"], registry=self.registry
        )
        self._stats: Callable[[], dict[str, Any]] | None = None

    def watch_engine(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def render(self) -> bytes:
        """The text exposition format, with engine gauges refreshed."""
        if self._stats is not None:
            snap = self._stats()
            self.queue_depth.set(snap.get("queue_depth", 0))
            self.batch_size.set(snap.get("batch_size", 0))
            self.tokens_per_s.set(snap.get("tokens_per_s", 0.0))
            self.cache_hit.labels("image").set(snap.get("image_cache_hit_rate", 0.0))
            self.cache_hit.labels("prefix").set(snap.get("prefix_cache_hit_rate", 0.0))
        return generate_latest(self.registry)
