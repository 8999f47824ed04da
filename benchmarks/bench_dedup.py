"""Memory and time of ``janus-pipeline dedup`` over N committed rows (no model, no Ray).

    python -m benchmarks.bench_dedup --rows 100000 1000000

Writes committed shards straight as Parquet + stats (10,000 rows a shard: key, status, random 64-bit
phash, score), with 10,000 rows at every size planted as near copies (1-5 bits flipped) of others, so
that the row count is what changes; then, in a fresh process per size, runs what the command runs
(``pipeline.dedup.dedup``) and reports its peak RSS above the process's baseline, its time, and how many
rows it lists.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from benchmarks.fresh import sizes_main, write_shard
from benchmarks.machine import cpu

PLANTED = 10_000  # near copies at every size


def write_output(root: Path, n: int, rows_per_shard: int) -> dict:
    """``n`` committed ok rows; returns how many are planted near copies of another row (and the
    distance and machine the result row records)."""
    rng = np.random.default_rng(0)
    hashes = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    copies = rng.choice(n, min(PLANTED, n // 4), replace=False)
    originals = rng.choice(np.setdiff1d(np.arange(n), copies), len(copies), replace=False)
    flips = [sum(1 << int(b) for b in rng.choice(64, rng.integers(1, 6), replace=False)) for _ in copies]
    hashes[copies] = hashes[originals] ^ np.array(flips, dtype=np.uint64).view(np.int64)
    scores = rng.random(n, dtype=np.float32)
    for start in range(0, n, rows_per_shard):
        stop = min(start + rows_per_shard, n)
        keys = [f"{i:020x}" for i in range(start, stop)]
        write_shard(root, start, keys, score=scores[start:stop], phash=hashes[start:stop])
    return {"planted": len(copies), "max_distance": 6, "cpu": cpu()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(root: str) -> dict:
    """In this (fresh) process: RSS after imports, then the peak RSS over the dedup command (the peak
    is reset first: ``ru_maxrss`` would count the parent's memory from before the exec)."""
    from pipeline.dedup import dedup

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident set, to the current one
    base = _status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    summary = dedup(root, max_distance=6)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") * 1024
    return {
        "rows": summary["compared"],
        "baseline_mb": round(base / 2**20, 1),
        "peak_above_baseline_mb": round((peak - base) / 2**20, 1),
        "peak_bytes_per_row": round((peak - base) / summary["compared"], 1),
        "seconds": round(seconds, 1),
        "listed": summary["remove"],
        "load_average_1m": round(os.getloadavg()[0], 1),  # a shared machine: the seconds are noisy
    }


if __name__ == "__main__":
    raise SystemExit(
        sizes_main(__doc__, "--rows", [100_000, 1_000_000], write_output, measure,
                   module="benchmarks.bench_dedup", results_file="dedup_memory.json")
    )  # fmt: skip
