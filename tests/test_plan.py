"""``janus-pipeline synthesize --plan``: the job's size and cost from its input listing, before it
runs (no Ray, no model)."""

from __future__ import annotations

import json
import subprocess
import sys

import fsspec
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.model_ref import janus_pro_size
from pipeline.plan import (
    DRIVER_BASELINE_BYTES,
    RESUME_BYTES_PER_KEY,
    format_plan,
    measured_images_per_s,
    plan_synthesis,
)
from pipeline.sources.prompt_files import count_prompt_rows, read_prompts
from tests.support import REPO
from tests.support.rows import model_row, write_rows
from tests.support.shapes import shapes_vq

JSONL = [
    {"prompt": "a red circle"},
    {"prompt": "a blue square", "n_samples": 3},
    {"prompt": ""},  # an error row
    {"prompt": "a green triangle", "seed": 7},
]


@pytest.fixture()
def prompts(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    lines = [json.dumps(r) for r in JSONL] + ["{not json"]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "b.txt").write_text("one\ntwo\n\nthree\n")
    return folder


def config(prompts, out, *extra: str):
    return load_config(
        None,
        [
            "job=synthesize",
            f"input.url={prompts}",
            f"output.url={out}",
            "synthesis.n_samples=2",
            "output.rows_per_shard=4",
            "compute.max_actors=8",
            *extra,
        ],
    )


def test_rows_are_counted_as_the_job_reads_them(prompts):
    fs = fsspec.filesystem("file")
    for name in ("a.jsonl", "b.txt"):
        path = str(prompts / name)
        rows = list(read_prompts(path, defaults=load_config(None, ["synthesis.n_samples=2"]).synthesis))
        assert count_prompt_rows(fs, path, 2) == (len(rows), sum(r["status"] == "error" for r in rows))


def test_the_plan_counts_rows_shards_bytes_driver_memory_and_gpu_hours(prompts, tmp_path):
    plan = plan_synthesis(config(prompts, tmp_path / "out", "model.path=deepseek-ai/Janus-Pro-7B"), 2.0, 4)
    # a.jsonl: 2 + 3 + 1 (empty) + 2 + 1 (bad JSON) = 9; b.txt: 3 x 2 + 1 (empty line) = 7
    assert plan["rows"] == {"total": 16, "committed": 0, "to_make": 16, "samples_per_prompt": 2}
    assert plan["input"]["files"] == 2 and plan["input"]["bad_lines"] == 3
    assert plan["shards"]["count"] == 4
    assert plan["output"]["bytes_per_row"] == pytest.approx(0.6 * 384 * 384 * 3 + 3450)
    assert plan["output"]["source"].startswith("assumed")
    assert plan["driver"]["resume_bytes"] == pytest.approx(DRIVER_BASELINE_BYTES + 16 * RESUME_BYTES_PER_KEY)
    gpu = plan["gpu"]
    assert gpu["images"] == 16 and gpu["source"] == "given"
    assert gpu["gpu_hours"] == pytest.approx(16 / 2.0 / 3600) and gpu["wall_hours"] == pytest.approx(
        16 / 2 / 3600 / 4
    )
    text = format_plan(plan)
    assert "16 to make" in text and "GPU-hours" in text and "on 4 GPUs" in text


def test_best_of_multiplies_the_images_and_gpus_default_to_the_pools_largest(prompts, tmp_path):
    plan = plan_synthesis(config(prompts, tmp_path / "out", "quality.best_of=4"), 10.0)
    assert plan["gpu"]["images"] == 64 and plan["gpu"]["gpus"] == 8


def test_without_a_figure_the_plan_asks_for_one_and_with_a_gpu_suite_run_it_uses_it(prompts, tmp_path):
    cfg = config(prompts, tmp_path / "out", "model.path=deepseek-ai/Janus-Pro-7B")
    results = tmp_path / "gpu_suite"
    results.mkdir()
    plan = plan_synthesis(cfg, results=results)
    assert plan["gpu"] is None and "pass --images-per-s" in format_plan(plan)
    table = [
        {"contender": "engine", "batch": 16, "images_per_s": 4.0},
        {"contender": "engine_compiled", "batch": 64, "images_per_s": 9.5},
        {"contender": "ref_parallel", "batch": 64, "images_per_s": 20.0},  # not ours
    ]
    (results / "synthesis_7b.json").write_text(json.dumps({"table": table}))
    plan = plan_synthesis(cfg, results=results)
    assert plan["gpu"]["images_per_s_per_gpu"] == 9.5
    assert plan["gpu"]["source"] == "measured: synthesis_7b.json, engine_compiled at batch 64"
    assert measured_images_per_s("1b", results) is None
    # the suite's summary (what comes back from the GPU machine) holds every section's record
    table[1]["images_per_s"] = 8.5
    sections = {"synthesis_7b": {"status": "ok", "record": {"table": table}}}
    (results / "summary.json").write_text(json.dumps({"sections": sections}))
    assert measured_images_per_s("7b", results) == (
        8.5,
        "measured: summary.json (synthesis_7b), engine_compiled at batch 64",
    )
    assert measured_images_per_s("1b", results) is None
    assert plan_synthesis(cfg, 3.0, results=results)["gpu"]["source"] == "given"  # the user's wins


@pytest.mark.parametrize(
    ("path", "size"),
    [
        ("deepseek-ai/Janus-Pro-7B", "7b"),
        ("s3://models/janus-pro-1b", "1b"),
        ("shapes", None),
        ("x/17b", None),
    ],
)
def test_the_model_size_is_read_from_its_name(path, size):
    assert janus_pro_size(path) == size


def test_a_resumed_output_counts_its_committed_rows_and_measures_its_bytes(prompts, tmp_path):
    out = tmp_path / "out"
    rows = [
        model_row(**r, image=np.full((96, 96, 3), 7, np.uint8), seconds=0.1, model="m")
        for r in read_prompts(str(prompts / "b.txt"))
        if r["status"] == "ok"
    ]
    write_rows(rows, str(out))
    plan = plan_synthesis(config(prompts, out, "model.path=shapes"), 5.0)
    assert plan["rows"]["committed"] == 3 and plan["rows"]["to_make"] == 13 and plan["gpu"]["images"] == 13
    size = sum(p.stat().st_size for p in out.iterdir())
    assert plan["output"]["bytes_per_row"] == pytest.approx(size / 3)
    assert plan["output"]["source"] == "measured: 1 committed shards of this output"


def test_an_embedded_model_plans_with_its_own_image_size(prompts, tmp_path):
    plan = plan_synthesis(config(prompts, tmp_path / "out", "model.path=shapes"))
    side = shapes_vq().image_size
    assert plan["output"]["bytes_per_row"] == pytest.approx(0.6 * side * side * 3 + 3450)


def test_the_resume_figure_is_the_benchmarks_recorded_one():
    recorded = json.loads((REPO / "benchmarks" / "results" / "resume_memory.json").read_text())
    at_10m = next(r for r in recorded if r["keys"] == 10_000_000)
    assert RESUME_BYTES_PER_KEY == at_10m["peak_total_bytes_per_key"]
    assert DRIVER_BASELINE_BYTES == at_10m["baseline_mb"] * 1e6


@pytest.mark.timeout(120)
def test_the_cli_plans_without_ray_or_the_model_and_a_missing_input_is_one_line(prompts, tmp_path):
    args = ["synthesize", "--plan", "--images-per-s", "2", "--set", f"input.url={prompts}"]
    args += ["--set", f"output.url={tmp_path / 'out'}"]
    code = (
        "import sys, ray\nfrom jobs.cli import main\n"
        f"rc = main({args!r})\n"
        "print('RAY', ray.is_initialized(), 'TORCH', 'torch' in sys.modules)\nsys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RAY False TORCH False" in proc.stdout
    assert "rows     11 (1 per prompt)" in proc.stdout and "GPU-hours" in proc.stdout
    missing = [*args[:-1], f"input.url={tmp_path / 'nothing'}"]
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *missing], cwd=REPO, capture_output=True, text=True, timeout=110
    )
    assert proc.returncode == 2 and proc.stderr.startswith("janus-pipeline: cannot plan:")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
