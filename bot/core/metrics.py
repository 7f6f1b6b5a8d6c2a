"""Prometheus metrics of the bot (requests, latency, tokens, quota rejections, readiness) and the engine gauges."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["BotMetrics"]

log = logging.getLogger(__name__)


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
        self.ready = Gauge(
            "minigpt4_ready", "1 when every readiness check passed (as /readyz answers), else 0", registry=self.registry
        )
        self.check_ok = Gauge(
            "minigpt4_check_ok", "1 when this readiness check passed: database, engine or a front end's name",
            ["check"], registry=self.registry,
        )  # fmt: skip
        self.answer_store_retries = Counter(
            "minigpt4_answer_store_retries", "Retries of an answer's final write after a database error",
            registry=self.registry,
        )  # fmt: skip
        self.answers_unsaved = Counter(
            "minigpt4_answers_unsaved", "Answers shown to the user whose final write failed for good",
            registry=self.registry,
        )  # fmt: skip
        self._stats: Callable[[], dict[str, Any]] | None = None

    def watch_engine(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def set_readiness(self, checks: dict[str, str]) -> None:
        """Record a readiness result: each check's state ("ok" or a problem) as ``minigpt4_check_ok``."""
        for name, state in checks.items():
            self.check_ok.labels(name).set(1 if state == "ok" else 0)
        self.ready.set(1 if all(state == "ok" for state in checks.values()) else 0)

    def render(self) -> bytes:
        """The text exposition format, with engine gauges refreshed (kept as they were if the engine does not
        answer: the metrics, ``minigpt4_check_ok{check="engine"}`` among them, must still be served)."""
        try:
            snap = self._stats() if self._stats is not None else None
        except Exception as exc:
            log.debug("metrics: the engine's stats failed: %r", exc)  # readiness logs the change once
            snap = None
        if snap is not None:
            self.queue_depth.set(snap.get("queue_depth", 0))
            self.batch_size.set(snap.get("batch_size", 0))
            self.tokens_per_s.set(snap.get("tokens_per_s", 0.0))
            self.cache_hit.labels("image").set(snap.get("image_cache_hit_rate", 0.0))
            self.cache_hit.labels("prefix").set(snap.get("prefix_cache_hit_rate", 0.0))
        return generate_latest(self.registry)
