"""An output holds one recipe: the weights' fingerprint, what counts as a difference, and a rerun with
another recipe refused before Ray starts, with one line per difference and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from janus.models.fingerprint import weights_fingerprint
from pipeline.job import check_job
from pipeline.output import OutputDir
from pipeline.recipe import RECIPE_FILE, RecipeMismatch, differences, job_recipe, record_recipe
from tests.support import REPO
from tests.support.jobs import job_config, job_overrides, write_prompts


def test_the_fingerprint_follows_the_weights_not_their_place(tiny_dir, model_dir, tmp_path):
    here = weights_fingerprint(tiny_dir)
    assert here.startswith("sha256:") and here == weights_fingerprint(f"file://{tiny_dir}")
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    assert weights_fingerprint(copy) == here
    fs = fsspec.filesystem("memory")
    for path in Path(tiny_dir).iterdir():
        fs.pipe(f"/fingerprint/{path.name}", path.read_bytes())
    assert weights_fingerprint("memory://fingerprint") == here  # read remotely, a few ranges a file
    assert weights_fingerprint(model_dir) != here  # another architecture
    from janus.checkpoints import write_tiny_checkpoint

    retrained = write_tiny_checkpoint(tmp_path / "seed1", seed=1)  # same files and sizes, other values
    assert (retrained / "pytorch_model.bin").stat().st_size == (Path(tiny_dir) / "pytorch_model.bin").stat().st_size
    assert weights_fingerprint(retrained) != here


def _cfg(model_dir: str, tmp_path: Path, *extra: str):
    return job_config(model_dir, "synthesize", tmp_path / "p.txt", tmp_path / "out", *extra)


def test_what_counts_as_another_recipe(model_dir, tmp_path):
    base = job_recipe(_cfg(model_dir, tmp_path), "sha256:a")
    same = [
        "compute.batch_size=2",
        "compute.max_actors=3",
        "engine.max_batch_size=2",
        "output.rows_per_shard=9",
        "input.url=elsewhere/p.txt",
        "synthesis.n_samples=3",  # more samples add rows; sample 0 keeps its key and image
        "output.contact_sheet=0",
    ]
    for setting in same:
        assert not differences(base, job_recipe(_cfg(model_dir, tmp_path, setting), "sha256:a")), setting
    moved = job_recipe(_cfg(str(tmp_path / "moved"), tmp_path), "sha256:a")
    assert moved["model.name"] != base["model.name"] and not differences(base, moved)  # same weights
    newer = {**base, "version": "9.9.9"}
    assert not differences(base, newer)  # recorded on every row, but an upgrade may resume an output
    other = job_recipe(
        _cfg(model_dir, tmp_path, "synthesis.cfg_weight=3", "quality.min_score=0.4", "model.dtype=bfloat16"),
        "sha256:b",
    )
    assert differences(base, other) == [
        'model.dtype: "float32" in the output, "bfloat16" now',
        'model.weights: "sha256:a" in the output, "sha256:b" now',
        "quality.min_score: null in the output, 0.4 now",
        "synthesis.cfg_weight: 5.0 in the output, 3.0 now",
    ]
    assert base["engine.speculative.method"] == "off" and base["keys"] == "janus-pipeline/1"


def test_a_rerun_with_another_recipe_is_refused_before_ray_starts(model_dir, tmp_path):
    write_prompts(tmp_path / "p.txt", 3)
    first = check_job(_cfg(model_dir, tmp_path))
    assert first.new_recipe and not (tmp_path / "out").exists()  # planning writes nothing
    record_recipe(OutputDir(str(tmp_path / "out")), first.recipe)
    assert json.loads((tmp_path / "out" / RECIPE_FILE).read_text()) == first.recipe
    assert not check_job(_cfg(model_dir, tmp_path, "compute.batch_size=2")).new_recipe  # same recipe
    with pytest.raises(RecipeMismatch, match="synthesis.temperature: 1.0 in the output, 0.5 now"):
        check_job(_cfg(model_dir, tmp_path, "synthesis.temperature=0.5"))

    args = [a for o in job_overrides(model_dir, str(tmp_path / "p.txt"), str(tmp_path / "out")) for a in ("--set", o)]
    changed = ["--set", "synthesis.cfg_weight=2", "--set", "synthesis.top_k=50"]
    cli = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "synthesize", *args, *changed],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "127.0.0.1:1"},  # a Ray it must never reach
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = cli.stderr.strip().splitlines()
    assert cli.returncode == 2, cli.stderr[-2000:]
    assert "write these to another output (output.url)" in lines[-3]
    assert lines[-2:] == [
        "synthesis.cfg_weight: 5.0 in the output, 2.0 now",
        "synthesis.top_k: null in the output, 50 now",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [RECIPE_FILE]  # nothing else written
