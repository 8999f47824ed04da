"""Memory benchmarks measure each size in a process of its own, started after the data is written: what
the parent allocated to write it must not count, and each size starts from the same baseline.

The output directories they measure are written straight as committed shards (Parquet + stats file, no
model, no Ray), as a finished job leaves them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from janus.utils.cli import OneLineParser

RESULTS = Path(__file__).parent / "results"


def measure_in_fresh_process(module: str, root: Path) -> dict:
    """``python -m module --measure root``: the JSON its ``measure`` printed."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "--measure", str(root)], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout)


def write_shard(root: Path, start: int, keys: list[str], **columns: Any) -> None:
    """One committed shard of ``ok`` rows, its first row numbered ``start``: Parquet and stats file."""
    shard = f"shard-{start:020d}"
    count = len(keys)
    table = pa.table({"key": keys, "status": ["ok"] * count, **columns})
    pq.write_table(table, root / f"{shard}.parquet", compression="zstd")
    stats = {"shard": shard, "count": count, "ok": count, "failed": 0}
    (root / f"{shard}_stats.json").write_text(json.dumps(stats))


def sizes_main(
    doc: str,
    size_flag: str,
    default_sizes: list[int],
    write: Callable[[Path, int, int], dict[str, Any]],
    measure: Callable[[str], dict],
    *,
    module: str,
    results_file: str,
) -> int:
    """The command line of a memory benchmark: for each size N of ``size_flag``, ``write`` N rows (it
    returns facts for the result row), ``measure`` them in a fresh ``python -m module``; the rows go to
    ``benchmarks/results/<results_file>``. ``--measure DIR`` is the fresh process's own call."""
    parser = OneLineParser(description=doc.split("\n")[0])
    parser.add_argument(size_flag, dest="sizes", type=int, nargs="+", default=default_sizes)
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure this directory
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"out-{n}"
            root.mkdir(parents=True)
            facts = write(root, n, args.rows_per_shard)
            row = measure_in_fresh_process(module, root)
            row.update(facts)
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / results_file).write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return 0
