"""The GPU suite cannot rot before a GPU is lent: its dry run is the whole script on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu import sections as sections_package
from benchmarks.gpu_suite import GPU_PLAN, SECTIONS, Recorder

ROOT = Path(__file__).resolve().parents[1]
#: A hang guard, not an expectation: the dry run starts ~20 Python processes (Ray and Serve), which
#: take 6 to over 14 minutes on a shared 2-core machine with a training job and other test runs.
DRY_RUN_LIMIT_S = 1200


def strict(text: str) -> dict:
    """JSON that any reader takes: no NaN or Infinity."""

    def reject(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def run_suite(out: Path, *args: str, limit_s: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def section(out: Path, name: str) -> dict:
    data = strict((out / f"{name}.json").read_text())
    failed = [(i["name"], i.get("error"), i.get("traceback")) for i in data["items"] if i["status"] != "ok"]
    assert data["status"] == "ok" and not failed, (data["status"], data.get("error"), failed)
    assert data["section"] == name and data["items"] and data["wall_s"] >= 0
    return data


@pytest.mark.slow
@pytest.mark.timeout(DRY_RUN_LIMIT_S + 60)
def test_the_dry_run_writes_every_section(tmp_path):
    run_suite(tmp_path, limit_s=DRY_RUN_LIMIT_S)
    # one JSON per section and summary.json, which holds every section's record: gpu_suite.sh puts the
    # summary alone (and the log) in $OUT, since the device returns at most 8 files of it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*(f"{s}.json" for s in SECTIONS), "summary.json"]
    )
    summary = strict((tmp_path / "summary.json").read_text())
    assert list(summary["sections"]) == list(SECTIONS)
    for name, s in summary["sections"].items():
        assert s["record"] == strict((tmp_path / f"{name}.json").read_text())
    assert all(s["status"] == "ok" and s["items_failed"] == 0 for s in summary["sections"].values())
    assert {g["goal"].split(":")[0] for g in summary["goals"]} == {"synthesis_1b", "synthesis_7b"}

    env = section(tmp_path, "environment")
    assert {i["name"] for i in env["items"]} == {"versions", "copy bandwidth", "bf16 matmul"}
    c4 = section(tmp_path, "correctness")["C4"]
    for part in ("understanding", "image_tokens_64"):
        assert {"equal", "agreement", "first_divergence"} <= set(c4[part]["greedy_tokens"])
        assert c4[part]["logits"]["max_abs_diff"] >= 0
    twins = [i for i in section(tmp_path, "correctness")["items"] if i["name"].startswith("equality twin")]
    assert len(twins) == 2 and all(i["result"] for i in twins)

    table = section(tmp_path, "synthesis_1b")["table"]
    assert {t["contender"] for t in table} == {"engine", "ref_parallel", "hf", "engine_compiled"}
    engine = next(t for t in table if t["contender"] == "engine")
    assert engine["images_per_s"] > 0 and engine["x_reference"] > 0 and engine["x_transformers"] > 0
    assert engine["llm_floor_s"] > 0 and engine["decode_steps_per_s"] > 0
    assert section(tmp_path, "synthesis_7b")["table"]
    assert {t["contender"] for t in section(tmp_path, "caption")["table"]} == {"engine", "ref_per_image"}

    efficiency = section(tmp_path, "ray_data")["efficiency"]
    assert efficiency["bare_images_per_s"] > 0 and efficiency["efficiency_end_to_end"] > 0
    serve = section(tmp_path, "serve")
    routes = {i["name"] for i in serve["items"]}
    assert {
        "GET /health",
        "GET /v1/models",
        "POST /v1/images/generations",
        "POST /v1/chat/completions",
    } <= routes


@pytest.mark.timeout(300)
def test_an_isolated_section_runs_in_its_own_process(tmp_path):
    run_suite(tmp_path, "--only", "environment", "--isolate", limit_s=240)
    assert section(tmp_path, "environment")["items"]
    assert json.loads((tmp_path / "summary.json").read_text())["isolated"] is True


def test_a_section_records_failures_and_skips_and_goes_on(tmp_path):
    rec = Recorder(tmp_path / "x.json", "x", budget_s=10, plan=GPU_PLAN)
    rec.set("not a number", float("nan"))
    assert rec.item("too long for the budget", lambda: 1, est_s=60) is None
    assert rec.item("breaks", lambda: 1 / 0) is None
    assert rec.item("works", lambda: {"v": 1}) == {"v": 1}
    rec.finish()
    data = strict((tmp_path / "x.json").read_text())
    assert data["not a number"] is None
    assert [i["status"] for i in data["items"]] == ["skipped", "failed", "ok"]
    assert "ZeroDivisionError" in data["items"][1]["traceback"] and data["status"] == "failed"


def test_a_module_in_the_sections_package_is_a_section(tmp_path, monkeypatch):
    """Adding a section is adding one file: the runner finds it and runs it in its order."""
    (tmp_path / "extra.py").write_text(
        "from benchmarks.gpu.section import Section\n"
        "SECTIONS = (Section('extra', order=45, budget_s=5, about='x', run=lambda rec, plan, work: None),)\n"
    )
    monkeypatch.setattr(sections_package, "__path__", [*sections_package.__path__, str(tmp_path)])
    try:
        found = list(sections_package.discover())
    finally:
        sys.modules.pop(f"{sections_package.__name__}.extra", None)
    assert found == [*SECTIONS[:4], "extra", *SECTIONS[4:]]
    assert found[:4] == ["environment", "correctness", "synthesis_1b", "synthesis_7b"]
