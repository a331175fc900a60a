"""Prometheus metrics of training jobs, read from the database at scrape time.

Jobs run in Celery worker processes, which Prometheus does not scrape. Counting the rows when
a web process is scraped gives the same numbers whichever process trained.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .models import TrainingJob

# Seconds; a job may run up to LORAWEB_JOB_TIME_LIMIT (six hours by default).
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 21600, 43200)


class TrainingJobCollector(Collector):
    """Report training jobs by state, and the durations of finished jobs, with two queries per scrape."""

    def describe(self) -> list[Metric]:
        # Without this, registering would call collect() at import time.
        return []

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("loraweb_training_jobs", "Training jobs in the database, by state.", labels=["state"])
        counts = dict(TrainingJob.objects.order_by().values_list("state").annotate(count=Count("pk")))
        for state in TrainingJob.State.values:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs

        durations = HistogramMetricFamily(
            "loraweb_training_job_duration_seconds",
            "Seconds from the start of a finished job to its end, by final state.",
            labels=["state"],
        )
        for state, buckets, total in finished_job_durations():
            durations.add_metric([state], buckets, total)
        yield durations


def finished_job_durations() -> list[tuple[str, list[tuple[str, float]], float]]:
    """Return (state, cumulative buckets, sum of seconds) for each final state, counted by the database.

    Jobs cancelled before they started have no start time and are left out.
    """
    duration = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    per_bucket = {
        f"le_{index}": Count("pk", filter=Q(duration__lte=timedelta(seconds=bound)))
        for index, bound in enumerate(DURATION_BUCKETS)
    }
    rows = (
        TrainingJob.objects.order_by()
        .filter(state__in=TrainingJob.FINAL_STATES, started_at__isnull=False, finished_at__isnull=False)
        .annotate(duration=duration)
        .values("state")
        .annotate(count=Count("pk"), total=Sum("duration"), **per_bucket)
    )
    by_state = {row["state"]: row for row in rows}

    result = []
    for state in TrainingJob.FINAL_STATES:
        row = by_state.get(state)
        if row is None:
            result.append((state, [(str(float(bound)), 0.0) for bound in DURATION_BUCKETS] + [("+Inf", 0.0)], 0.0))
            continue
        buckets = [(str(float(bound)), float(row[f"le_{index}"])) for index, bound in enumerate(DURATION_BUCKETS)]
        buckets.append(("+Inf", float(row["count"])))
        total = row["total"].total_seconds() if row["total"] is not None else 0.0
        result.append((str(state), buckets, total))
    return result
