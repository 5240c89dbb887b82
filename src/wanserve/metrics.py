"""Prometheus metrics, each `Metrics` with its own registry so that several apps (and tests) in one process
never collide. Torch-free: the API, the worker and the CLI all use it.

Queue depth and running counts are read from the store when Prometheus scrapes, not tracked by the
process: with several API replicas and workers only the store knows the truth.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wanserve.errors import StoreUnavailable

log = logging.getLogger(__name__)

# Generation takes seconds to an hour; queue waits can be as long.
_JOB_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _CountingStore(Protocol):
    def counts(self, model: str) -> tuple[int, int]: ...

    def ping(self) -> bool: ...


class _StoreCollector(Collector):
    def __init__(self, store: _CountingStore, models: Sequence[str]) -> None:
        self._store = store
        self._models = tuple(models)

    def describe(self) -> Iterable[Metric]:
        # Declared without samples so registering does not query the store.
        return [
            GaugeMetricFamily("wanserve_queue_depth", "Jobs waiting, per model", labels=["model"]),
            GaugeMetricFamily("wanserve_jobs_running", "Jobs being generated, per model", labels=["model"]),
        ]

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("wanserve_queue_depth", "Jobs waiting, per model", labels=["model"])
        running = GaugeMetricFamily("wanserve_jobs_running", "Jobs being generated, per model", labels=["model"])
        # A quick probe first: while the store is down, its client's retries (~9 s) would outlast the scrape's
        # timeout and lose every other metric with it.
        if not self._store.ping():
            log.warning("queue counts left out of this scrape: the job store does not answer")
            yield depth
            yield running
            return
        for model in self._models:
            try:
                counts = self._store.counts(model)
                depth.add_metric([model], counts.queued)
                running.add_metric([model], counts.running)
            except StoreUnavailable as exc:
                # A scrape must not fail because the store blinked; the gap in the series shows it. One store
                # serves every model, so the others would only wait out the same retries.
                log.warning("could not read queue counts for %s: %s", model, exc)
                break
            except Exception:
                log.warning("could not read queue counts for %s", model, exc_info=True)
                break
        yield depth
        yield running


FINAL_STATUSES = ("completed", "failed", "cancelled")


class Metrics:
    def __init__(self, models: Sequence[str] = ()) -> None:
        """`models`: those served here, whose job series exist from the start, at zero: rate(), increase() and
        absence alerts then see the first job (a series born at 1 looks like no change)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._store_collector: _StoreCollector | None = None
        self.jobs_submitted = Counter(
            "wanserve_jobs_submitted", "Jobs accepted into the queue", ["model"], registry=self.registry
        )
        self.jobs_finished = Counter(
            "wanserve_jobs_finished",
            "Jobs that reached a final state",
            ["model", "status"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "wanserve_job_queue_wait_seconds",
            "Time from submission (or from its return to the queue, after a hand-back) to the start of generation",
            ["model"],
            buckets=_JOB_BUCKETS,
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "wanserve_job_duration_seconds",
            "Time from the start of generation to the final state",
            ["model"],
            buckets=_JOB_BUCKETS,
            registry=self.registry,
        )
        self.denoise_step_seconds = Histogram(
            "wanserve_denoise_step_seconds",
            "Duration of one denoising step",
            ["model"],
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "wanserve_http_request_duration_seconds",
            "HTTP request duration, labelled by route template",
            ["method", "route", "status"],
            buckets=_HTTP_BUCKETS,
            registry=self.registry,
        )
        for model in models:
            for status in FINAL_STATUSES:
                self.jobs_finished.labels(model=model, status=status)
            self.queue_wait.labels(model=model)
            self.job_duration.labels(model=model)
            self.denoise_step_seconds.labels(model=model)

    @property
    def watching_store(self) -> bool:
        return self._store_collector is not None

    def watch_store(self, store: _CountingStore, models: Sequence[str]) -> None:
        """Report queue depth and running jobs for `models`, read from `store` at each scrape."""
        if self._store_collector is not None:
            self.registry.unregister(self._store_collector)
        self._store_collector = _StoreCollector(store, models)
        self.registry.register(self._store_collector)
        for model in models:  # where jobs are submitted (the API), their count starts at zero too
            self.jobs_submitted.labels(model=model)

    def job_submitted(self, model: str) -> None:
        self.jobs_submitted.labels(model=model).inc()

    def job_claimed(self, model: str, queue_wait: float) -> None:
        """At the claim, not at the end: a wait seen only when its job ended (an hour later for a 14B video,
        never for one handed back on a drain) lagged every alert on it by a whole job."""
        self.queue_wait.labels(model=model).observe(max(queue_wait, 0.0))

    def job_finished(self, model: str, status: str, duration: float) -> None:
        self.jobs_finished.labels(model=model, status=status).inc()
        self.job_duration.labels(model=model).observe(max(duration, 0.0))

    def job_ended_unrun(self, model: str, status: str) -> None:
        """A job that ended without a worker's run to time: cancelled while queued, or failed after its workers
        kept dying. Counted, but kept out of the wait and duration histograms, which it would skew to 0."""
        self.jobs_finished.labels(model=model, status=status).inc()

    def denoise_step(self, model: str, seconds: float) -> None:
        self.denoise_step_seconds.labels(model=model).observe(max(seconds, 0.0))

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_duration.labels(method=method, route=route, status=str(status)).observe(seconds)
