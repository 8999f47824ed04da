"""Every documented way onto a cluster works, or is refused in one line.

A real head (``ray start --head``, token authentication on, 127.0.0.1 only; ``tests/support/ray_head.py``)
started and stopped by this module: the plain local command beside it, ``ray.address=auto``, and the
demo job submitted through its Jobs API with the token, as README.md says. (``ray://`` and relative
outputs of submitted jobs are refused before Ray starts: tests/test_config.py.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.jobs import cli_summary, job_overrides, output_rows
from tests.support.ray_head import RayHead

STAND_IN = "compute.actor_class=tests.support.scale_actors:StandInSynthesizer"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = RayHead(tmp_path_factory.mktemp("head"))
    try:
        yield h
    finally:
        h.stop()


def cli(args: list[str], env: dict[str, str], log: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """A command as a user types it, in the repository, its output kept in ``log``."""
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(args)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def stand_in_job(tmp_path: Path, out: str, *extra: str) -> list[str]:
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    overrides = job_overrides("stand-in", str(tmp_path / "p.txt"), out, STAND_IN, "output.contact_sheet=0", *extra)
    return ["janus-pipeline", "synthesize", *(a for o in overrides for a in ("--set", o))]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_beside_a_running_head_the_plain_command_starts_a_private_ray_and_auto_attaches(head, tmp_path):
    """``ray.init()`` finds the head (``ray_current_cluster`` in its temp dir), so the plain command with
    ``ray.num_cpus`` set failed with "num_cpus and num_gpus must not be provided"."""
    args = stand_in_job(tmp_path, str(tmp_path / "private"), "ray.num_cpus=2", "compute.gpus_per_actor=0")
    proc = cli(args, head.env, tmp_path / "private.log")
    assert proc.returncode == 0, (tmp_path / "private.log").read_text()
    assert "starting a private local Ray for this job (num_cpus=2" in proc.stderr
    assert "the Ray already running on this machine" in proc.stderr and "set ray.address=auto" in proc.stderr
    assert "Token authentication" not in proc.stderr  # asked for explicitly: on, without Ray's warning
    assert cli_summary(proc.stdout)["total"]["ok"] == 2

    # attaching on purpose: ray.num_cpus sizes only a Ray the job starts, and the log says it is ignored
    args = stand_in_job(tmp_path, str(tmp_path / "attached"), "ray.address=auto", "ray.num_cpus=2")
    proc = cli(args, head.with_token(), tmp_path / "attached.log")
    assert proc.returncode == 0, (tmp_path / "attached.log").read_text()
    # auto is the cluster `ray start` began here (its address file), whatever other Ray runs beside it
    assert "attaching to the Ray cluster at auto (" in proc.stderr and f":{head.gcs_port})" in proc.stderr
    assert "ignoring ray.num_cpus=2: they size a Ray that the job starts" in proc.stderr
    assert {r["status"] for r in output_rows(str(tmp_path / "attached"))} == {"ok"}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ray_job_submit_runs_the_demo_job_with_the_heads_token(head, tmp_path):
    submit = ["ray", "job", "submit", "--address", head.jobs_api, "--working-dir", ".", "--"]
    demo = ["janus-pipeline", "synthesize", "--config", "configs/demo_synthesize.yaml"]
    out = tmp_path / "submitted"

    # without the token the Jobs API refuses the submission
    proc = cli([*submit, *demo, "--set", f"output.url={out}"], head.env, tmp_path / "no-token.log", timeout=300)
    assert proc.returncode != 0 and "Authentication" in proc.stdout + proc.stderr, proc
    assert not out.exists()

    # with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, as README.md says: the demo job runs on the head
    proc = cli([*submit, *demo, "--set", f"output.url={out}"], head.with_token(), tmp_path / "submit.log")
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text()
    assert "attaching to the Ray cluster at" in proc.stdout
    rows = output_rows(str(out))
    assert len(rows) == 16 and {r["status"] for r in rows} == {"ok"}

    # a relative output path would land in the job's temporary copy of --working-dir: refused, one line
    proc = cli([*submit, *demo, "--set", "output.url=out/submitted"], head.with_token(), tmp_path / "relative.log")
    assert proc.returncode != 0
    refused = [line for line in proc.stdout.splitlines() if line.startswith("janus-pipeline: ")]
    assert len(set(refused)) == 1 and "output.url: 'out/submitted' is relative" in refused[0], proc.stdout
    assert not (REPO / "out" / "submitted").exists()
