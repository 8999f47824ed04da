"""Driver memory of a resume: peak RSS while loading N committed keys and checking them for duplicates.

    python -m benchmarks.bench_resume_memory --keys 1000000 10000000

Writes committed shards straight as Parquet + stats files (no model, no Ray), then, in a fresh process
per size, runs what a job's driver runs on resume and at the end: ``OutputDir.committed_keys()`` and
``OutputDir.duplicates()``. Reports the peak RSS above the process's baseline, per key.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.fresh import measure_in_fresh_process
from janus.utils.cli import OneLineParser

RESULTS = Path(__file__).parent / "results"


def write_committed(root: Path, n: int, rows_per_shard: int) -> None:
    """``n`` committed rows in shards of ``rows_per_shard``: what a finished synthesis job leaves."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for start in range(0, n, rows_per_shard):
        count = min(rows_per_shard, n - start)
        raw = rng.integers(0, 256, size=(count, 10), dtype=np.uint8)
        keys = [bytes(r).hex() for r in raw]
        shard = f"shard-{start:020d}"
        table = pa.table(
            {"key": keys, "status": ["ok"] * count, "prompt": ["a red circle on the left"] * count}
        )
        stats = {"shard": shard, "count": count, "ok": count, "failed": 0}
        (root / f"{shard}_stats.json").write_text(json.dumps(stats))
        pq.write_table(table, root / f"{shard}.parquet", compression="zstd")


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


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure this directory
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.keys:
            root = Path(tmp) / f"out-{n}"
            t0 = time.perf_counter()
            write_committed(root, n, args.rows_per_shard)
            print(f"wrote {n} committed rows in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            row = measure_in_fresh_process("benchmarks.bench_resume_memory", root)
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resume_memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
