"""The quality settings through a synthesis job: ``min_score``, ``best_of``, ``ratings`` and
``embeddings`` in the committed output, filtered rows final, and a rerun that makes nothing again."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.job import run_job
from pipeline.recipe import RecipeMismatch
from tests.support.jobs import job_overrides, output_rows, write_prompts

RATE = "How would you rate the aesthetics of this image?"
#: splits the best-of-2 scores that model_dir's random model gives these 12 prompts (0.5009-0.5061;
#: seven below, five above, the nearest 4e-4 away), so the job both keeps and filters rows
MIN_SCORE = 0.5044


def quality_job(model_dir: str, tmp_path: Path, *extra: str):
    overrides = job_overrides(model_dir, str(tmp_path / "p.txt"), str(tmp_path / "out"))
    quality = [
        f"quality.min_score={MIN_SCORE}",
        "quality.best_of=2",
        f"quality.ratings={json.dumps({'aesthetic': RATE})}",
        "quality.embeddings=true",
    ]
    return load_config(None, ["job=synthesize", *overrides, "output.contact_sheet=0", *quality, *extra])


def tar_members(out: Path) -> set[str]:
    names = set()
    for path in out.glob("shard-*.tar"):
        with tarfile.open(path) as tar:
            names |= set(tar.getnames())
    return names


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quality_settings_through_a_job(ray_session, model_dir, tmp_path):
    keys = write_prompts(tmp_path / "p.txt", 12)
    out = tmp_path / "out"
    summary = run_job(quality_job(model_dir, tmp_path))
    rows = output_rows(str(out))
    assert sorted(r["key"] for r in rows) == sorted(keys)
    by_status = {s: [r for r in rows if r["status"] == s] for s in ("ok", "filtered", "error")}
    assert by_status["ok"] and by_status["filtered"] and not by_status["error"], [r["score"] for r in rows]
    members = tar_members(out)
    for r in rows:
        # best_of: both candidates scored, the kept one is the best, and it decides the status
        assert len(r["scores"]) == 2 and r["score"] == max(r["scores"]) == r["scores"][r["candidate"]]
        assert (r["status"] == "filtered") == (r["score"] < MIN_SCORE)
        assert 1 <= r["rating_aesthetic"] <= 5
        assert abs(np.linalg.norm(np.asarray(r["embedding"], np.float32)) - 1) < 1e-2
        in_tar = {f"{r['key']}.png", f"{r['key']}.txt", f"{r['key']}.json"} <= members
        assert in_tar == (r["status"] == "ok") and (r["member"] is None) == (r["status"] == "filtered")
    for r in by_status["filtered"]:
        assert f"< min_score {MIN_SCORE}" in r["error"] and r["phash"] is not None  # the score is kept
    n_filtered = len(by_status["filtered"])
    assert summary["this_run"]["filtered"] == summary["total"]["filtered"] == n_filtered
    assert sum(json.loads(p.read_text())["filtered"] for p in out.glob("*_stats.json")) == n_filtered
    assert summary["filtered_rows"].startswith(f"{n_filtered} rows scored below") and "final" in summary["filtered_rows"]

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run_job(quality_job(model_dir, tmp_path, "compute.batch_size=2"))  # batch size: same recipe
    assert again["this_run"]["count"] == 0 and again["total"] == summary["total"]  # filtered rows are final
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(RecipeMismatch, match=rf"quality.min_score: {MIN_SCORE} in the output, 0.2 now"):
        run_job(quality_job(model_dir, tmp_path, "quality.min_score=0.2"))  # a looser threshold: refused
