"""ray_data: the product's batch entry point on the GPU. ``python -m jobs.cli synthesize`` (what
``janus-pipeline synthesize`` runs) with one GPU actor, end to end, against the bare engine loop over
the same prompts and checkpoint (loaded through the loader)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu.device import free_memory
from benchmarks.gpu.models import call_estimate_s, write_checkpoint
from benchmarks.gpu.plan import Plan
from benchmarks.gpu.processes import (
    RAY_START_TRIES,
    ROOT,
    last_json_object,
    log_tail,
    product_env,
    ray_start_timed_out,
    stop_process,
)
from benchmarks.gpu.record import Recorder
from benchmarks.gpu.section import Section

#: the job's prompts and rows per model call: on the GPU, and in the dry run
GPU_JOB = {"rows": 64, "batch": 32}
DRY_JOB = {"rows": 2, "batch": 2}


def run_job_cli(plan: Plan, checkpoint: Path, prompts: Path, out: Path, log: Path, timeout_s: float) -> dict:
    """``python -m jobs.cli synthesize`` (what ``janus-pipeline synthesize`` runs), one model actor."""
    from benchmarks.bench_pipeline import commit_times, engine_seconds

    cuda = plan.gpu
    b = plan.pick(GPU_JOB, DRY_JOB)["batch"]
    sets = {
        "model.path": checkpoint,
        "model.dtype": plan.dtype,
        "input.url": prompts,
        "output.url": out,
        "synthesis.n_samples": 1,
        "compute.batch_size": b,
        "engine.max_batch_size": b,
        "output.rows_per_shard": b,
        "output.contact_sheet": 0,
        "quality.score": "false",  # like for like with the bare engine loop
        "compute.gpus_per_actor": 1 if cuda else 0,
        "ray.num_gpus": 1 if cuda else 0,
        **({} if cuda else {"ray.num_cpus": 2}),
    }
    cmd = [sys.executable, "-m", "jobs.cli", "synthesize"]
    cmd += [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]
    stdout = log.with_suffix(".stdout")
    deadline = time.time() + timeout_s
    for attempt in range(1, RAY_START_TRIES + 1):
        t0 = time.time()
        with open(stdout, "wb") as f, open(log, "ab") as err:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=product_env(), stdout=f, stderr=err, start_new_session=True
            )
            try:
                code = proc.wait(max(1.0, deadline - t0))
            except subprocess.TimeoutExpired:
                stop_process(proc, grace_s=5.0)
                raise TimeoutError(
                    f"the job ran past {timeout_s:.0f} s; its log ends:\n{log_tail(log)}"
                ) from None
        # the job failed before it read anything: its Ray did not start in time; once more, from scratch
        if code == 0 or attempt == RAY_START_TRIES or not ray_start_timed_out(log, stdout):
            break
        print(
            f"ray_data: the job's local Ray did not start in time; starting the job again ({log})", flush=True
        )
    wall = time.time() - t0
    if code != 0:
        raise RuntimeError(f"the job exited with {code}; its log ends:\n{log_tail(log)}{log_tail(stdout)}")
    summary = last_json_object(stdout.read_text())
    commits = commit_times(out)
    steady = None
    if len(commits) > 1:  # shards after the first, over the time between the first and the last commit
        steady = (summary["this_run"]["count"] - b) / (commits[-1] - commits[0])
    return {
        "command": " ".join(str(c) for c in cmd),
        "cli_wall_s": wall,
        "job_starts": attempt,
        "summary": summary,
        "actor_engine_s": engine_seconds(out),
        "first_commit_s": commits[0] - t0 if commits else None,
        "after_last_commit_s": t0 + wall - commits[-1] if commits else None,
        "steady_images_per_s": steady,
    }


def section_ray_data(rec: Recorder, plan: Plan, work: Path) -> None:
    import torch

    from benchmarks.bench_pipeline import bare_loop
    from pipeline.sources.prompt_files import read_prompts

    job = plan.pick(GPU_JOB, DRY_JOB)
    job_rows, job_batch = job["rows"], job["batch"]
    device = torch.device(plan.device)
    shape = plan.pick(gpu="1b", dry="tiny48")
    checkpoint = work / f"checkpoint-{shape}-{plan.dtype}"
    written = rec.item(
        f"{shape} checkpoint written (safetensors)",
        lambda: write_checkpoint(checkpoint, shape, plan.dtype, device),
        10,
    )
    free_memory()
    if written is None:
        return
    prompts = work / "job_prompts.txt"
    prompts.write_text("".join(f"prompt {i}: a small scene with {i} objects\n" for i in range(job_rows)))
    rows = list(read_prompts(str(prompts)))  # the job's own keys and seeds
    requests = [{k: r[k] for k in ("prompt", "seed", "cfg_weight", "temperature")} for r in rows]
    rec.set(
        "measured",
        f"{len(rows)} prompts, batch {job_batch}, {plan.dtype}, compile off in both (a compile would "
        "dominate a job this short); bare loop: the loader, a warm-up call, then SynthesisEngine.generate "
        "per batch in this process; job: `python -m jobs.cli synthesize` end to end (process start, local "
        "Ray, one GPU actor loading the same checkpoint, PNG + tar + Parquet sink)",
    )

    def bare() -> dict[str, Any]:
        t: dict[str, float] = {}
        seconds = bare_loop(checkpoint, requests, job_batch, dtype=plan.dtype, device=plan.device, timings=t)
        free_memory()
        return {
            "bare_s": seconds,
            "images_per_s": len(rows) / seconds,
            "load_s": t["load_s"],
            "loader_gb_s": written["weight_bytes"] / t["load_s"] / 1e9,
            "warmup_s": t["warmup_s"],
        }

    est_batch = call_estimate_s(shape, "engine", job_batch)
    n_batches = -(-len(rows) // job_batch)
    base = rec.item("bare engine loop (loader included)", bare, 10 + est_batch * (n_batches + 1))
    job = rec.item(
        "Ray Data job: python -m jobs.cli synthesize",
        lambda: run_job_cli(plan, checkpoint, prompts, work / "job_out", work / "job.log", rec.timeout() - 2),
        18 + est_batch * n_batches,
    )
    if base and job:
        run_job_s = job["summary"]["this_run"]["seconds"]
        steady = job["steady_images_per_s"]
        rec.set(
            "efficiency",
            {
                "bare_images_per_s": base["images_per_s"],
                "job_images_per_s_end_to_end": len(rows) / job["cli_wall_s"],
                "efficiency_end_to_end": base["bare_s"] / job["cli_wall_s"],
                "efficiency_run_job": base["bare_s"] / run_job_s,
                "steady_images_per_s": steady,
                "efficiency_steady": None if steady is None else steady / base["images_per_s"],
                "engine_share_of_run_job": job["actor_engine_s"] / run_job_s,
                "note": "end to end includes the CLI's start, Ray's start and the actor's model load, which a "
                f"{len(rows)}-row job cannot amortise; steady = shards after the first over their commit times",
            },
        )


SECTIONS = (
    Section(
        "ray_data",
        order=60,
        budget_s=60,
        about="`python -m jobs.cli synthesize` with one GPU actor against the bare engine loop",
        run=section_ray_data,
    ),
)
