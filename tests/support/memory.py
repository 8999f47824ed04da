"""Memory of a running job, sampled from outside: the cluster's object stores and a driver's RSS."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

from .local_cluster import LocalCluster


class MemoryWatch(threading.Thread):
    """Samples, every 0.2 s, the cluster's object store use and spilling since the watch began (Ray's
    memory stats, summed over all nodes) and a driver process's resident memory (``rss``: (time, bytes)
    pairs)."""

    def __init__(self, cluster: LocalCluster | None, driver_pid: int):
        super().__init__(daemon=True)
        self.cluster, self.driver_pid = cluster, driver_pid
        self.store_peak = self.spilled = 0
        # a cluster that earlier jobs used may have spilled already: Ray's count never goes down
        self._spilled_before = cluster.store_stats()[1] if cluster is not None else 0
        self.rss: list[tuple[float, int]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            try:
                status = Path(f"/proc/{self.driver_pid}/status").read_text()
            except OSError:
                return
            if "VmRSS:" not in status:  # the driver has exited
                return
            self.rss.append((time.time(), int(status.split("VmRSS:")[1].split()[0]) * 1024))
            if self.cluster is not None:
                used, spilled = self.cluster.store_stats()
                self.store_peak = max(self.store_peak, used)
                self.spilled = max(self.spilled, spilled - self._spilled_before)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def rss_between(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in self.rss if start <= t <= end]


def streaming_finished_at(log: Path) -> float:
    """When Ray Data says the job's dataset finished, from the driver's log."""
    line = next(line for line in log.read_text().splitlines() if "execution finished in" in line)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
