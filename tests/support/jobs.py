"""Running the batch jobs in tests: shared overrides, the CLI as a child process, reading the output.

Waits on a job are bounded by its progress, not by a wall clock: a slower machine makes a job slower,
not wrong, so a wait fails only when no new shard has been committed for ``STALL_S`` seconds;
pytest-timeout bounds each test as a whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq

from pipeline.config import JobConfig, load_config
from pipeline.job import REQUEST_EXPIRE_S
from pipeline.sources.prompt_files import read_prompts

from . import REPO

#: a job that commits nothing new for this long is stuck
STALL_S = 600.0
#: the longest a job may take to reach its first batch or shard: the actors' start and model load take
#: up to 7 minutes on a 2-core machine shared with other Ray jobs and a training run
START_S = 1200.0


def job_overrides(model_dir: str, input_url: str, output_url: str, *extra: str) -> list[str]:
    """``--set`` values shared by the job tests: the tiny model, small batches and shards. (Keys of one
    job only, such as ``caption.max_new_tokens``, are errors in the other's config: tests add them.)"""
    return [
        f"model.path={model_dir}",
        "model.dtype=float32",
        f"input.url={input_url}",
        f"output.url={output_url}",
        "output.rows_per_shard=4",
        "compute.batch_size=4",
        "engine.max_batch_size=4",
        *extra,
    ]


def job_config(model_dir: str, job: str, input_url: str | Path, output_url: str | Path, *extra: str) -> JobConfig:
    """The validated config of a ``job`` over ``job_overrides``, as the CLI would load it."""
    return load_config(None, [f"job={job}", *job_overrides(model_dir, str(input_url), str(output_url), *extra)])


def million_row_job(input_url: str, output_url: str, s3_options: dict, n: int) -> list[str]:
    """Writes ``n`` prompts as one JSONL object at ``input_url``; the overrides of a job that runs
    them through a stand-in that rejects every row (a test's and a benchmark's): it exits with
    ``ROWS_FAILED``, since no row succeeds."""
    fs, path = fsspec.core.url_to_fs(input_url, **s3_options)
    with fs.open(path, "wb") as f:
        for start in range(0, n, 100_000):
            lines = (
                json.dumps({"prompt": f"a small scene, number {i}"})
                for i in range(start, min(n, start + 100_000))
            )
            f.write(("\n".join(lines) + "\n").encode())
    so = json.dumps(s3_options)
    return job_overrides(
        "stand-in",
        input_url,
        output_url,
        f"input.storage_options={so}",
        f"output.storage_options={so}",
        "output.contact_sheet=0",
        "output.rows_per_shard=50000",
        "compute.batch_size=10000",
        "compute.actor_class=tests.support.scale_actors:RejectingStandInSynthesizer",
        "compute.gpus_per_actor=0",
        "compute.max_actors=2",
    )


def write_prompts(path: Path, n: int) -> list[str]:
    """``n`` distinct prompts in a txt file; their row keys."""
    path.write_text("".join(f"prompt {i}: a small scene number {i}\n" for i in range(n)))
    return [r["key"] for r in read_prompts(str(path))]


def output_rows(url: str, storage_options: dict | None = None) -> list[dict]:
    """Every committed row under ``url``, read with pyarrow (not our own reader)."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.invalidate_cache()
    rows = []
    for path in sorted(fs.glob(f"{root}/shard-*.parquet")):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def committed_shards(url: str, storage_options: dict | None = None) -> int:
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.invalidate_cache()
    return len(fs.glob(f"{root}/*.parquet"))


def wait_until(
    condition: Callable[[], object], what: str, ended: Callable[[], str | None], timeout: float = START_S
) -> None:
    """Until ``condition()`` holds; fails at once when ``ended()`` says why waiting is pointless (the
    job exited), or after ``timeout``: a generous bound for waits on a job's first steps."""
    deadline = time.monotonic() + timeout
    while not condition():
        reason = ended()
        assert reason is None, f"waiting for {what}, but {reason}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.2)


def session_env(ray_session) -> dict[str, str]:
    """Environment for a CLI driver that joins the test session's local Ray."""
    address = ray_session.get_runtime_context().gcs_address
    return {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO)}


def cli_summary(stdout: str) -> dict:
    """The summary JSON a CLI job prints, from its stdout: Ray may forward lines from the cluster
    before it and after it (a lost node's connection errors, say)."""
    return json.JSONDecoder().raw_decode(stdout, stdout.rindex('{\n  "job"'))[0]


@dataclass
class CliJob:
    """``python -m jobs.cli`` in its own process (a Ray driver, as users run it). Its stderr, the job
    log, goes to ``log`` and its stdout (the summary) next to it: files, so a chatty job never blocks
    on a pipe and a failing test can show what the job said."""

    proc: subprocess.Popen
    log: Path

    @property
    def stdout(self) -> Path:
        return self.log.with_suffix(".out")

    def tail(self, chars: int = 4000) -> str:
        return (
            f"--- job log (stderr) {self.log}:\n{self.log.read_text(errors='replace')[-chars:]}\n"
            f"--- stdout {self.stdout}:\n{self.stdout.read_text(errors='replace')[-chars // 4 :]}"
        )

    def ended(self) -> str | None:
        """Why waiting for this job to do something is pointless (it exited), or None."""
        if self.proc.poll() is None:
            return None
        return f"the job ended first (rc {self.proc.returncode}):\n{self.tail()}"

    def wait_for(self, condition: Callable[[], object], what: str, timeout: float = START_S) -> None:
        try:
            wait_until(condition, what, self.ended, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None

    def wait(self, progress: Callable[[], object] | None = None, stall_s: float = STALL_S) -> int:
        """Its exit code, once it exits; fails (and kills it) when ``progress()`` (say, the number of
        committed shards; by default the size of its output, which Ray Data's progress lines keep
        growing) has not changed for ``stall_s`` seconds."""
        last, since = None, time.monotonic()
        while self.proc.poll() is None:
            mark = progress() if progress else (self.log.stat().st_size, self.stdout.stat().st_size)
            if mark != last:
                last, since = mark, time.monotonic()
            elif time.monotonic() - since > stall_s:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the job made no progress for {stall_s:.0f} s:\n{self.tail()}")
            time.sleep(1.0)
        return self.proc.returncode

    def finish(
        self, progress: Callable[[], object] | None = None, stall_s: float = STALL_S, returncode: int = 0
    ) -> dict:
        """Wait for a job that must end with ``returncode`` (0: it succeeded); its summary."""
        rc = self.wait(progress, stall_s)
        assert rc == returncode, f"job ended with rc {rc}, not {returncode}:\n{self.tail()}"
        return cli_summary(self.stdout.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


#: every CLI job started in this session, so that a fixture can stop what a failed test left running
STARTED: list[CliJob] = []


def kill_running() -> int:
    """Kill the CLI jobs still running (a test that ended early left them); how many there were."""
    running = [job for job in STARTED if job.proc.poll() is None]
    for job in running:
        job.kill()
    STARTED.clear()
    return len(running)


def start_cli(
    job: str, overrides: list[str], env: dict[str, str], log: Path, python_flags: tuple[str, ...] = ()
) -> CliJob:
    """``python [python_flags] -m jobs.cli job --set ...`` (``-X importtime``: the driver's imports
    go to the log, for ``driver_imports``)."""
    args = [a for value in overrides for a in ("--set", value)]
    with log.open("w") as err, log.with_suffix(".out").open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, *python_flags, "-m", "jobs.cli", job, *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=err,
        )
    STARTED.append(CliJob(proc, log))
    return STARTED[-1]


def driver_imports(log: Path) -> set[str]:
    """The modules a driver started with ``python_flags=("-X", "importtime")`` imported (its own
    process only: Ray's workers do not inherit the flag)."""
    lines = log.read_text(errors="replace").splitlines()
    found = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert "pipeline.job" in found, "no import times in the log: was the driver started with -X importtime?"
    return found


def kill_driver_mid_job(
    job: str, overrides: list[str], ray_session, log: Path, gate: Any, out: str
) -> None:
    """Run ``job`` on the session's Ray with a gated stand-in actor and SIGKILL its driver once two
    shards are committed and the third batch is held in the actor: the kill always lands mid-job. The
    gate is open again when this returns, and the dead driver's resource reservation is checked to
    expire within ``REQUEST_EXPIRE_S`` (at Ray's default it starved the next job for ~3 min)."""
    gate.hold(from_call=2)  # two batches (two shards) get through, the third is in flight when killed
    cli = start_cli(job, overrides, session_env(ray_session), log)
    try:
        gate.wait_for_entry(lambda e: e.held, cli.ended)
        cli.wait_for(lambda: committed_shards(out) >= 2, "two committed shards")
        cli.proc.send_signal(signal.SIGKILL)
        cli.proc.wait(timeout=60)
    finally:
        cli.kill()
        gate.open()
    left = resource_requests_left_s(ray_session)
    assert left and max(left.values()) <= REQUEST_EXPIRE_S + 1, left


def _requests_left_s(coordinator: Any) -> dict[str, float]:
    now = time.time()  # the coordinator's own clock (it runs where this function runs)
    return {rid: req.expiration_time - now for rid, req in coordinator._ongoing_reqs.items()}


def resource_requests_left_s(ray_session) -> dict[str, float]:
    """Ray Data's resource requests on the session's Ray: requester -> seconds until it expires. Read
    inside Ray's coordinator actor (internal state, pinned Ray version): no public API lists them."""
    coordinator = ray_session.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    return ray_session.get(coordinator.__ray_call__.remote(_requests_left_s), timeout=60)
