"""A job that completed says so in its output (``_complete.json``): rerun with the same input and the
same row-deciding settings, it ends at once, without Ray or a model; any change to what decides its
rows (an input file, ``synthesis.n_samples``) or to its shards (one deleted) runs it again, and
only the missing rows are made. Model-free stand-ins on the session's Ray."""

from __future__ import annotations

import json
import logging

import pytest

import pipeline.job
from pipeline.config import load_config
from pipeline.job import run_job
from pipeline.output import COMPLETE_FILE, OutputDir
from pipeline.storage import StorageError
from tests.support.jobs import job_overrides, output_rows

STAND_IN = "compute.actor_class=tests.support.scale_actors:StandInSynthesizer"


def config(tmp_path, *extra: str):
    overrides = job_overrides("stand-in", str(tmp_path / "p.txt"), str(tmp_path / "out"), STAND_IN)
    return load_config(None, ["job=synthesize", *overrides, "compute.gpus_per_actor=0", "output.contact_sheet=0", *extra])


def no_ray(monkeypatch):
    """A run that reaches Ray, or reads the committed keys or the shards' stats, fails the test."""

    def refused(*args):
        raise AssertionError("this run should neither start Ray nor read the committed keys or stats")

    monkeypatch.setattr(pipeline.job, "connect", refused)
    monkeypatch.setattr(OutputDir, "committed_keys", refused)
    monkeypatch.setattr(OutputDir, "duplicates", refused)
    monkeypatch.setattr(OutputDir, "totals", refused)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_finished_job_reruns_without_ray_until_its_rows_change(ray_session, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.job")
    (tmp_path / "p.txt").write_text("a red circle\na blue square\nthe sea\n")
    out = tmp_path / "out"

    def unwritable(*args):
        raise StorageError("cannot write: the store said no")

    with monkeypatch.context() as m:  # the marker cannot be written: the job still succeeds, and says so
        m.setattr(OutputDir, "mark_complete", unwritable)
        unmarked = run_job(config(tmp_path))
    assert unmarked["this_run"]["count"] == 3 and unmarked["complete"] and not (out / COMPLETE_FILE).exists()
    assert "not recorded as complete" in caplog.text
    first = run_job(config(tmp_path))  # every key is committed: nothing made, the marker written
    assert first["this_run"]["count"] == 0 and first["complete"]
    marker = json.loads((out / COMPLETE_FILE).read_text())
    assert marker["total"] == first["total"] and first["total"]["count"] == 3
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with monkeypatch.context() as m:  # unchanged; how it runs and the credentials do not decide rows
        no_ray(m)
        how = ("compute.batch_size=2", "max_failed_fraction=0.5", 'input.storage_options={"auto_mkdir": true}')
        again = run_job(config(tmp_path, *how))
    assert again["this_run"]["count"] == 0 and again["total"] == first["total"] and again["complete"]
    assert "nothing to run" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written

    with (tmp_path / "p.txt").open("a") as f:  # a prompt more: only its row is made
        f.write("the sky\n")
    grown = run_job(config(tmp_path))
    assert grown["this_run"]["count"] == 1 and grown["total"]["count"] == 4

    more = run_job(config(tmp_path, "synthesis.n_samples=2"))  # a setting that decides rows
    assert more["this_run"]["count"] == 4 and more["total"]["count"] == 8

    shard = sorted(out.glob("shard-*.parquet"))[0]  # a committed shard deleted: its rows again
    shard.unlink()
    left = len(output_rows(str(out)))
    redone = run_job(config(tmp_path, "synthesis.n_samples=2"))
    assert left < 8 and redone["this_run"]["count"] == 8 - left and redone["total"]["count"] == 8

    (out / COMPLETE_FILE).write_text("{not json")  # unreadable: the committed keys decide, as without it
    checked = run_job(config(tmp_path, "synthesis.n_samples=2"))
    assert checked["this_run"]["count"] == 0 and checked["total"]["count"] == 8
    assert checked["duplicate_keys"] == 0
    with monkeypatch.context() as m:  # and the marker is whole again
        no_ray(m)
        assert run_job(config(tmp_path, "synthesis.n_samples=2"))["this_run"]["count"] == 0
