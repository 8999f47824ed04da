"""Memory and time of ``janus-pipeline dedup`` over N committed rows (no model, no Ray).

    python -m benchmarks.bench_dedup --rows 100000 1000000

Writes committed shards straight as Parquet + stats (10,000 rows a shard: key, status, random 64-bit
phash, score), with 1% of the rows planted as near copies (1-5 bits flipped) of others; then, in a fresh
process per size, runs what the command runs (``pipeline.dedup.dedup``) and reports its peak RSS above
the process's baseline, its time, and how many planted copies it lists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.fresh import measure_in_fresh_process
from benchmarks.machine import cpu
from janus.utils.cli import OneLineParser

RESULTS = Path(__file__).parent / "results"
PLANTED = 0.01


def write_output(root: Path, n: int, rows_per_shard: int) -> int:
    """``n`` committed ok rows; returns how many are planted near copies of another row."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    hashes = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    copies = rng.choice(n, int(n * PLANTED), replace=False)
    originals = rng.choice(np.setdiff1d(np.arange(n), copies), len(copies), replace=False)
    flips = [sum(1 << int(b) for b in rng.choice(64, rng.integers(1, 6), replace=False)) for _ in copies]
    hashes[copies] = hashes[originals] ^ np.array(flips, dtype=np.uint64).view(np.int64)
    scores = rng.random(n, dtype=np.float32)
    for start in range(0, n, rows_per_shard):
        stop = min(start + rows_per_shard, n)
        keys = [f"{i:020x}" for i in range(start, stop)]
        shard = f"shard-{start:020d}"
        table = pa.table(
            {"key": keys, "status": ["ok"] * len(keys), "score": scores[start:stop], "phash": hashes[start:stop]}
        )
        pq.write_table(table, root / f"{shard}.parquet", compression="zstd")
        (root / f"{shard}_stats.json").write_text(json.dumps({"shard": shard, "count": len(keys), "ok": len(keys)}))
    return len(copies)


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


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure this directory
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rows:
            root = Path(tmp) / f"out-{n}"
            planted = write_output(root, n, args.rows_per_shard)
            row = measure_in_fresh_process("benchmarks.bench_dedup", root)
            row.update(planted=planted, max_distance=6, cpu=cpu())
            print(json.dumps(row), file=sys.stderr)
            results.append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dedup_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
