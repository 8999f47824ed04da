"""Driver memory of a resume: peak RSS while loading N committed keys and checking them for duplicates.

    python -m benchmarks.bench_resume_memory --keys 1000000 10000000

Writes committed shards straight as Parquet + stats files (no model, no Ray), then, in a fresh process
per size, runs what a job's driver runs on resume and at the end: ``OutputDir.committed_keys()`` and
``OutputDir.duplicates()``. Reports the peak RSS above the process's baseline, per key.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.fresh import sizes_main, write_shard


def write_committed(root: Path, n: int, rows_per_shard: int) -> dict:
    """``n`` committed rows in shards of ``rows_per_shard``: what a finished synthesis job leaves."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for start in range(0, n, rows_per_shard):
        count = min(rows_per_shard, n - start)
        raw = rng.integers(0, 256, size=(count, 10), dtype=np.uint8)
        keys = [bytes(r).hex() for r in raw]
        write_shard(root, start, keys, prompt=["a red circle on the left"] * count)
    print(f"wrote {n} committed rows in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return {}


def measure(root: str) -> dict:
    """In this (fresh) process: baseline RSS after imports, then peak RSS over resume + duplicate check."""
    from pipeline.output import OutputDir

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    out = OutputDir(root)
    keys = out.committed_keys()
    n = int(keys.size)
    load_s = time.perf_counter() - t0
    del keys
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t1 = time.perf_counter()
    duplicates = out.duplicates()
    dup_s = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "keys": n,
        "shards": len(out.committed_shards),
        "baseline_mb": round(base / 2**20, 1),
        "peak_resume_bytes_per_key": round((after_load - base) / n, 1),
        "peak_total_bytes_per_key": round((peak - base) / n, 1),
        "resume_load_s": round(load_s, 2),
        "duplicate_check_s": round(dup_s, 2),
        "duplicates": len(duplicates),
    }


if __name__ == "__main__":
    raise SystemExit(
        sizes_main(__doc__, "--keys", [1_000_000, 10_000_000], write_committed, measure,
                   module="benchmarks.bench_resume_memory", results_file="resume_memory.json")
    )  # fmt: skip
