"""Synthesis job throughput against actor count on a local multi-node Ray cluster.

    python -m benchmarks.bench_scaling [--rows 96] [--actors 1,2,4] [--out benchmarks/results/scaling_cpu.json]

A head node and two worker nodes (separate raylets, ``ray.cluster_utils.Cluster``, all on 127.0.0.1)
run the real job through the real CLI (``RAY_ADDRESS`` set), once per actor count, with the tiny
model (48 px images, 576 image tokens each) on CPU actors of one CPU each, spread over the workers.
Per run it reports the job's own wall time (driver start to summary, actor start-up included) and the
steady rate: rows committed after the first shard, divided by the time from the first to the last
shard (Parquet file times). On a machine with fewer cores than actors the steady rate stops growing
at the core count: the numbers say what this machine can do, not what the code can.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.machine import cpu
from janus.checkpoints import write_tiny_checkpoint
from janus.utils.cli import OneLineParser
from tests.support import REPO
from tests.support.jobs import cli_summary
from tests.support.local_cluster import WORKER_RESOURCE, LocalCluster


def run_once(cluster: LocalCluster, model: str, prompts: Path, out: Path, actors: int) -> dict:
    """One synthesis job with ``actors`` actors; its timings."""
    settings = [
        f"model.path={model}",
        "model.dtype=float32",
        f"input.url={prompts}",
        f"output.url={out}",
        "output.rows_per_shard=8",
        "output.contact_sheet=0",
        "engine.max_batch_size=8",
        "compute.batch_size=8",
        f"compute.min_actors={actors}",
        f"compute.max_actors={actors}",
        "compute.gpus_per_actor=0",
        "compute.cpus_per_actor=1",
        f"compute.resources={{{WORKER_RESOURCE}: 1}}",
    ]
    args = [a for value in settings for a in ("--set", value)]
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "synthesize", *args],
        cwd=REPO,
        env=cluster.driver_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - t0
    summary = cli_summary(done.stdout)
    shards = sorted(out.glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    first, last = shards[0].stat().st_mtime, shards[-1].stat().st_mtime
    after_first = sum(pq.read_metadata(p).num_rows for p in shards[1:])
    return {
        "actors": actors,
        "rows": summary["this_run"]["count"],
        "wall_s": round(wall, 1),
        "rows_per_s": round(summary["this_run"]["count"] / wall, 2),
        "steady_rows_per_s": round(after_first / (last - first), 2) if last > first else None,
    }


def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--actors", default="1,2,4")
    ap.add_argument("--out", default="benchmarks/results/scaling_cpu.json")
    args = ap.parse_args(argv)
    counts = [int(a) for a in args.actors.split(",")]
    per_worker = -(-max(counts) // 2)

    load = os.getloadavg()[0]  # other work on this machine skews the numbers: recorded with them
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    model = str(write_tiny_checkpoint(work / "tiny", seed=5, vq_ch_mult=(1, 2)))
    prompts = work / "prompts.txt"
    prompts.write_text("".join(f"a small scene number {i}, soft light\n" for i in range(args.rows)))
    cluster = LocalCluster()
    try:
        for _ in range(2):  # CPU actors: the fake GPUs only carry the worker resource that places them
            cluster.add_worker(cpus=per_worker + 1, gpus=per_worker)
        runs = [run_once(cluster, model, prompts, work / f"out-{k}", k) for k in counts]
    finally:
        cluster.shutdown()

    meta = {
        "setup": "local cluster: head (2 CPUs) + 2 workers, separate raylets on 127.0.0.1",
        "model": "tiny (vq_ch_mult 1,2: 48 px, 576 image tokens), float32, CPU actors of 1 CPU",
        "batch": 8,
        "machine": cpu(),
        "load_average_at_start": load,
    }
    print(f"{'actors':>6} {'rows':>5} {'wall s':>7} {'rows/s':>7} {'steady rows/s':>14}")
    for r in runs:
        print(
            f"{r['actors']:>6} {r['rows']:>5} {r['wall_s']:>7} {r['rows_per_s']:>7} {r['steady_rows_per_s']!s:>14}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
