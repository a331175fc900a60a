"""Prometheus metrics of serving: completions, the adapter cache and the scheduler.

Completions are counted here as they finish. The cache and scheduler keep plain counters of
their own (`AdapterCache.stats`, `Scheduler.stats`), because `serving/` stays free of this
project's frameworks. `ServingCollector` reads them at scrape time. Every metric lives in the
default registry of this process, so each server process is scraped on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

COMPLETIONS = Counter(
    "loraweb_completions",
    "Completions that ended, by task slug and status: ok, or the error code sent to the client.",
    ["task", "status"],
)
COMPLETION_SECONDS = Histogram(
    "loraweb_completion_duration_seconds",
    "Seconds from queueing a successful completion (prompt tokenized, adapter loaded) to its last token.",
    ["task"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
# Rows per forward pass. Fixed bounds, so replicas with other LORAWEB_MAX_BATCH_SIZE values
# can still be summed.
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def record_completion(task_slug: str, seconds: float) -> None:
    COMPLETIONS.labels(task=task_slug, status="ok").inc()
    COMPLETION_SECONDS.labels(task=task_slug).observe(seconds)


def record_completion_failure(task_slug: str, code: str) -> None:
    COMPLETIONS.labels(task=task_slug, status=code).inc()


def batch_histogram(sizes: Mapping[int, int]) -> tuple[list[tuple[str, float]], float]:
    """Return the cumulative buckets and the sum of a {rows: passes} table, as Prometheus histograms need."""
    buckets = []
    for bound in BATCH_ROW_BUCKETS:
        buckets.append((str(float(bound)), float(sum(count for rows, count in sizes.items() if rows <= bound))))
    buckets.append(("+Inf", float(sum(sizes.values()))))
    return buckets, float(sum(rows * count for rows, count in sizes.items()))


class ServingCollector(Collector):
    """Read the engine's cache and the scheduler's counters when Prometheus scrapes.

    Reads only what is loaded: a process whose engine is not loaded yet reports
    `loraweb_base_model_loaded 0` and nothing else, so a scrape never loads the model.
    """

    def describe(self) -> list[Metric]:
        # Without this, registering would call collect() at import time.
        return []

    def collect(self) -> Iterator[Metric]:
        from .inference import loaded_engine

        engine, scheduler = loaded_engine()
        yield GaugeMetricFamily(
            "loraweb_base_model_loaded", "1 when this process has loaded the base model, else 0.", value=int(engine is not None)
        )
        if engine is None:
            return

        cache = engine.cache.stats()
        yield CounterMetricFamily("loraweb_adapter_cache_hits", "Adapter requests served from the cache.", value=cache.hits)
        yield CounterMetricFamily(
            "loraweb_adapter_cache_misses", "Adapter requests not in the cache, which read the adapter from disk.", value=cache.misses
        )
        yield CounterMetricFamily("loraweb_adapter_cache_loads", "Adapters read from disk into the cache.", value=cache.loads)
        yield CounterMetricFamily(
            "loraweb_adapter_cache_evictions", "Adapters dropped from the cache to stay within its limits.", value=cache.evictions
        )
        yield GaugeMetricFamily("loraweb_adapter_cache_adapters", "Adapters in the cache.", value=cache.count)
        yield GaugeMetricFamily("loraweb_adapter_cache_bytes", "Bytes of adapter weights in the cache.", value=cache.bytes)
        yield GaugeMetricFamily("loraweb_adapter_cache_pinned", "Adapter keys pinned in the cache.", value=cache.pinned)
        if scheduler is None:
            return

        stats = scheduler.stats()
        yield GaugeMetricFamily("loraweb_scheduler_queue_depth", "Requests waiting for a batch slot.", value=stats.waiting)
        yield GaugeMetricFamily("loraweb_scheduler_running", "Requests decoding in the running batch.", value=stats.running)
        outcomes = CounterMetricFamily(
            "loraweb_scheduler_requests",
            "Requests through the scheduler, by outcome: submitted, completed, failed, rejected (queue full), "
            "cancelled, timed_out.",
            labels=["outcome"],
        )
        for outcome in ("submitted", "completed", "failed", "rejected", "cancelled", "timed_out"):
            outcomes.add_metric([outcome], getattr(stats, outcome))
        yield outcomes
        yield CounterMetricFamily(
            "loraweb_generated_tokens",
            "Tokens sampled by the scheduler, end-of-text included; rate() of it is tokens per second.",
            value=stats.generated_tokens,
        )
        batches = HistogramMetricFamily(
            "loraweb_batch_rows", "Rows per forward pass, by phase: prefill or decode.", labels=["phase"]
        )
        for phase, sizes in (("prefill", stats.prefill_batch_sizes), ("decode", stats.decode_batch_sizes)):
            buckets, total = batch_histogram(sizes)
            batches.add_metric([phase], buckets, total)
        yield batches


REGISTRY.register(ServingCollector())
