"""The driver's memory while a million-row synthesis job streams through it.

    python -m benchmarks.bench_driver_memory [--rows 1000000] [--out benchmarks/results/driver_memory.json]

The job of ``tests/test_scale.py::test_a_million_row_input_streams_through_a_bounded_driver``: one
JSONL object of ``--rows`` prompts on S3 (moto's server on 127.0.0.1), the real reader, resume filter
and sink, and a model-free stand-in actor that rejects every row (the cheapest row to write). The
CLI driver joins a local Ray started here; its resident memory is sampled every 0.2 s. Reported: the
driver's growth while the rows stream (from the first committed shard to Ray Data's "execution
finished"), which stays flat when the driver holds block references rather than rows, and its peak
over the start, reached in the final exactly-once check over the committed keys, per key. These are
measurements of one machine and allocator, so they live here and not in the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import fsspec
import ray
from moto.server import ThreadedMotoServer

from benchmarks.machine import cpu
from janus.utils.cli import OneLineParser
from jobs.outcome import ROWS_FAILED
from tests.support.jobs import committed_shards, million_row_job, session_env, start_cli
from tests.support.memory import MemoryWatch, streaming_finished_at


def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--out", default="benchmarks/results/driver_memory.json")
    args = ap.parse_args(argv)

    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-driver-memory-"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    s3 = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3", **s3).mkdir(bucket)
    out = f"s3://{bucket}/out"
    overrides = million_row_job(f"s3://{bucket}/in/prompts.jsonl", out, s3, args.rows)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        cli = start_cli("synthesize", overrides, session_env(ray), work / "job.log")
        watch = MemoryWatch(None, cli.proc.pid)
        watch.start()
        cli.wait_for(lambda: committed_shards(out, s3) >= 1, "a first committed shard")
        first_shard = time.time()
        summary = cli.finish(lambda: committed_shards(out, s3), returncode=ROWS_FAILED)  # every row rejected
        watch.stop()
    finally:
        ray.shutdown()
        server.stop()

    streaming = watch.rss_between(first_shard, streaming_finished_at(cli.log))
    peak = max(rss for _, rss in watch.rss)
    result = {
        "rows": summary["this_run"]["count"],
        "job_s": summary["this_run"]["seconds"],
        "rss_at_first_shard_mib": round(streaming[0] / 2**20, 1),
        "rss_growth_while_streaming_mib": round((max(streaming) - streaming[0]) / 2**20, 1),
        "rss_peak_over_start_mib": round((peak - streaming[0]) / 2**20, 1),
        "peak_bytes_per_key": round((peak - streaming[0]) / args.rows, 1),
    }
    meta = {
        "machine": cpu(),
        "load_average_at_start": load,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "result": result}, indent=2))


if __name__ == "__main__":
    main()
