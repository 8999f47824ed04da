"""What the batch jobs' model actors count, through Ray's metrics (``ray.util.metrics``; Ray's Prometheus
export shows them as ``ray_<name>``): rows by status, and each actor's rows per second. Outside Ray
(an actor class used in-process) recording does nothing."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable

from ray.util.metrics import Counter, Gauge

ROWS = "janus_batch_rows"
ROWS_PER_SECOND = "janus_batch_rows_per_second"
#: every metric name above -> its kind, for the dashboard's test
METRICS = {ROWS: "counter", ROWS_PER_SECOND: "gauge"}


class BatchMetrics:
    """One actor's: ``batch(statuses, started)`` after each batch it answered."""

    def __init__(self, actor: str, model: str):
        self.tags = {"actor": actor, "model": model}
        self._rows = Counter(
            ROWS,
            "Rows the model actors answered, by status (ok, error, filtered).",
            ("actor", "model", "status"),
        )
        self._rate = Gauge(
            ROWS_PER_SECOND, "Rows per second of each model actor's latest batch.", ("actor", "model")
        )

    def batch(self, statuses: Iterable[str], started: float) -> None:
        counts = collections.Counter(statuses)
        for status, n in counts.items():
            self._rows.inc(n, tags={**self.tags, "status": status})
        seconds = time.perf_counter() - started
        if seconds > 0:
            self._rate.set(sum(counts.values()) / seconds, tags=self.tags)
