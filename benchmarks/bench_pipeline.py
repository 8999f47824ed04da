"""Pipeline efficiency: the Ray Data synthesis job's images/s over the bare engine loop's images/s.

    python -m benchmarks.bench_pipeline [--rows 32] [--batch 8] [--out benchmarks/results/pipeline.json]

Same tiny model, same batch size, one model actor vs one in-process engine, CPU. The bare loop is
``SynthesisEngine.generate`` over the rows in batches; the job is ``run_job`` (read -> actor pool ->
shard sink, PNG encoding and Parquet included) on a local Ray started for it. The job's time
excludes Ray start-up but includes actor start-up (process start, imports, model load), which a long
job amortises: ``efficiency`` is end to end, ``steady_efficiency`` the rate between the first and the
last committed shard over the bare loop's rate. Ray sets OMP_NUM_THREADS to the actor's CPUs, so the
bare loop runs with the same number of torch threads (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from janus.engine import SynthesisEngine
from janus.models import MultiModalityCausalLM, VLChatProcessor
from janus.testing import write_tiny_checkpoint


def steady_state(out: Path) -> tuple[int, float]:
    """Rows committed after the first shard, and the seconds from the first shard's commit to the
    last's (Parquet mtimes): the job's throughput once its actor is up, i.e. what a long job runs at.
    The end-to-end number also pays for starting the actor process and loading the model."""
    shards = sorted(out.glob("shard-*.parquet"), key=lambda p: p.stat().st_mtime)
    if len(shards) < 2:
        raise SystemExit("need at least two shards for a steady-state rate: raise --rows")
    import pyarrow.parquet as pq

    rows = sum(pq.read_metadata(p).num_rows for p in shards[1:])
    return rows, shards[-1].stat().st_mtime - shards[0].stat().st_mtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads for the bare loop = CPUs of the model actor (Ray sets OMP_NUM_THREADS to it)",
    )
    parser.add_argument("--out", default="benchmarks/results/pipeline_tiny_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import ray

    from pipeline.config import load_config
    from pipeline.job import run_job
    from pipeline.sources import read_prompts

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    model_dir = write_tiny_checkpoint(work / "tiny", seed=0)
    prompts = work / "prompts.txt"
    prompts.write_text(
        "\n".join(f"prompt {i}: a small scene with {i} objects" for i in range(args.rows)) + "\n"
    )
    rows = list(read_prompts(str(prompts)))

    model = MultiModalityCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = SynthesisEngine(model, VLChatProcessor.from_pretrained(model_dir), max_batch_size=args.batch)
    requests = [{k: r[k] for k in ("prompt", "seed", "cfg_weight", "temperature")} for r in rows]
    engine.generate(requests[:1])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(requests), args.batch):
        engine.generate(requests[i : i + args.batch])
    bare_s = time.perf_counter() - t0
    del engine, model

    # one logical CPU more than the actor takes, for the read and write tasks around it
    ray.init(num_cpus=args.threads + 1, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.dtype=float32",
            f"input.url={prompts}",
            f"output.url={work / 'out'}",
            f"compute.batch_size={args.batch}",
            f"engine.max_batch_size={args.batch}",
            f"output.rows_per_shard={args.batch}",
            "output.contact_sheet=0",
            f"compute.cpus_per_actor={args.threads}",
        ],
    )
    t0 = time.perf_counter()
    summary = run_job(cfg)
    job_s = time.perf_counter() - t0
    ray.shutdown()
    assert summary["this_run"]["ok"] == len(rows), summary
    steady_rows, steady_s = steady_state(work / "out")

    result = {
        "command": (
            f"python -m benchmarks.bench_pipeline --rows {args.rows} --batch {args.batch} --threads {args.threads}"
        ),
        "threads": args.threads,
        "device": "cpu",
        "model": "tiny (2L x 64 LLM, VQ ch 32, 384 px)",
        "rows": len(rows),
        "batch": args.batch,
        "bare_engine_images_per_s": len(rows) / bare_s,
        "job_images_per_s": len(rows) / job_s,
        "efficiency": bare_s / job_s,
        "steady_job_images_per_s": steady_rows / steady_s,
        "steady_efficiency": (steady_rows / steady_s) / (len(rows) / bare_s),
        "bare_s": bare_s,
        "job_s": job_s,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
