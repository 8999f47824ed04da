"""Pipeline efficiency: the Ray Data synthesis job's images/s over the bare engine loop's images/s.

    python -m benchmarks.bench_pipeline [--rows 32] [--batch 8] [--threads 1]
                                        [--out benchmarks/results/pipeline.json]

Same tiny model, same batch size, one model actor vs one in-process engine, CPU. The bare loop is
``SynthesisEngine.generate`` over the rows in batches (after a warm-up call); it runs once before the
job and once after it, and the faster run is the reference (the machine is shared; the faster run is
the conservative choice). The job is ``run_job`` (read -> actor pool -> shard sink, PNG encoding and
Parquet included) on a local Ray started for it. The job's time excludes Ray start-up but includes
the actor's (process start, imports, model load), which a long job amortises.

``efficiency`` is end to end: bare loop seconds / job seconds. ``engine_share_of_job`` is the
actor's own engine seconds (from the rows' ``seconds`` column) over the job's seconds: what the job
spends outside the model, independent of how fast the bare loop happened to run.

Ray sets OMP_NUM_THREADS to the actor's CPUs, so the bare loop runs with the same number of torch
threads (``--threads``). Ray gets one CPU more than the actor, for the read and write tasks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.machine import cpu
from janus.checkpoints import write_tiny_checkpoint
from janus.engine import SynthesisEngine
from janus.models import MultiModalityCausalLM, VLChatProcessor
from janus.utils.cli import OneLineParser


def bare_loop(
    model_dir: Path,
    requests: list[dict],
    batch: int,
    *,
    dtype: str = "float32",
    device: str | None = None,
    timings: dict[str, float] | None = None,
) -> float:
    """Seconds for ``SynthesisEngine.generate`` over ``requests`` in batches, after a warm-up call.

    ``device`` None: the loader's default (cuda when there is one). ``timings`` (if given) receives
    load_s (the loader: files to weights on the device) and warmup_s.
    """
    t0 = time.perf_counter()
    model = MultiModalityCausalLM.from_pretrained(model_dir, dtype=dtype, device=device)
    engine = SynthesisEngine(model, VLChatProcessor.from_pretrained(model_dir), max_batch_size=batch)
    t1 = time.perf_counter()
    engine.generate(requests[:1])
    t2 = time.perf_counter()
    for i in range(0, len(requests), batch):
        engine.generate(requests[i : i + batch])
    if timings is not None:
        timings.update(load_s=t1 - t0, warmup_s=t2 - t1)
    return time.perf_counter() - t2


def engine_seconds(out: Path) -> float:
    """The actors' engine time: each row carries its batch's engine seconds / batch size."""
    import pyarrow.parquet as pq

    return sum(
        float(pq.read_table(p, columns=["seconds"]).column("seconds").to_numpy().sum())
        for p in out.glob("shard-*.parquet")
    )


def commit_times(out: Path) -> list[float]:
    """Wall-clock commit time of every shard (its Parquet file's mtime), oldest first."""
    return sorted(p.stat().st_mtime for p in out.glob("shard-*.parquet"))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the bare loop = CPUs of the model actor (Ray sets OMP_NUM_THREADS to it)",
    )
    parser.add_argument("--out", default="benchmarks/results/pipeline_tiny_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import ray

    from pipeline.config import load_config
    from pipeline.job import run_job
    from pipeline.sources.prompt_files import read_prompts

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    model_dir = write_tiny_checkpoint(work / "tiny", seed=0)
    prompts = work / "prompts.txt"
    prompts.write_text(
        "\n".join(f"prompt {i}: a small scene with {i} objects" for i in range(args.rows)) + "\n"
    )
    rows = list(read_prompts(str(prompts)))
    requests = [{k: r[k] for k in ("prompt", "seed", "cfg_weight", "temperature")} for r in rows]
    bare_runs = [bare_loop(model_dir, requests, args.batch)]

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
    t0, wall0 = time.perf_counter(), time.time()
    summary = run_job(cfg)
    job_s = time.perf_counter() - t0
    wall1 = time.time()
    ray.shutdown()
    assert summary["this_run"]["ok"] == len(rows), summary
    bare_runs.append(bare_loop(model_dir, requests, args.batch))
    bare_s = min(bare_runs)
    actor_engine_s = engine_seconds(work / "out")
    commits = commit_times(work / "out")

    result = {
        "command": (
            f"python -m benchmarks.bench_pipeline --rows {args.rows} --batch {args.batch} --threads {args.threads}"
        ),
        "threads": args.threads,
        "device": f"cpu: {cpu()}",
        "model": "tiny (2L x 64 LLM, VQ ch 32, 384 px)",
        "rows": len(rows),
        "batch": args.batch,
        "bare_engine_images_per_s": len(rows) / bare_s,
        "job_images_per_s": len(rows) / job_s,
        "efficiency": bare_s / job_s,
        "bare_s": bare_s,
        "bare_runs_s": bare_runs,
        "job_s": job_s,
        "actor_engine_s": actor_engine_s,
        "outside_engine_s": job_s - actor_engine_s,
        "engine_share_of_job": actor_engine_s / job_s,
        # before the first commit: actor process start, imports, model load, the first block
        "first_commit_s": commits[0] - wall0,
        # after the last commit: the final cleanup, totals and duplicate check over the output
        "after_last_commit_s": wall1 - commits[-1],
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
