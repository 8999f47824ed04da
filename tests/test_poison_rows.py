"""Poison rows: a row that crashes its model actor every time ends as one error row; the rest complete.

Without the crash guard (pipeline/crash_guard.py) Ray restarts the actor and retries the batch with
the row in it for as long as it has restarts, and the job never finishes with that row.
"""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.crash_guard import CRASH_LIMIT, CrashJournal
from pipeline.job import run_job
from pipeline.sources.prompt_files import read_prompts
from tests.support.jobs import job_overrides, output_rows
from tests.support.scale_actors import POISON

CRASHING = "compute.actor_class=tests.support.scale_actors:CrashingStandInSynthesizer"


def test_the_journal_blames_a_death_on_a_row_only_when_it_ran_alone_on_a_node_still_up():
    lost: set[str] = set()
    journal = CrashJournal(is_alive=lambda node: node not in lost)
    assert journal.begin("b", ["k1", "k2", "k3"], "n1") is False  # a first attempt
    # the actor died with the whole batch in flight: no row is blamed, the retry runs row by row
    assert journal.begin("b", ["k1", "k2", "k3"], "n1") is True
    assert not journal.deaths
    assert journal.start_row("b", "k1") and journal.start_row("b", "k2")
    # ... and died again on k2, alone: k2 is blamed once, so it runs again
    assert journal.begin("b", ["k1", "k2", "k3"], "n1") is True
    assert [journal.start_row("b", k) for k in ("k1", "k2")] == [True, True]
    # ... and died on k2 again: blamed twice, it is given up; the rest runs
    assert journal.begin("b", ["k1", "k2", "k3"], "n1") is True
    assert [journal.start_row("b", k) for k in ("k1", "k2", "k3")] == [True, False, True]
    journal.end("b")
    assert journal.deaths == {"k2": CRASH_LIMIT}
    # batches that end are forgotten and never run row by row
    assert journal.begin("c", ["k4"], "n1") is False
    journal.end("c")
    assert journal.begin("c", ["k4"], "n1") is False and journal.in_flight == {"c": ("n1", ["k4"])}


def test_node_losses_alone_never_blame_a_row():
    """Two nodes lost during the same rows: the batch's first attempt, then its row-by-row retry with
    k2 alone in flight. Blaming every row in flight made k2 an error row here."""
    lost: set[str] = set()
    journal = CrashJournal(is_alive=lambda node: node not in lost)
    journal.begin("b", ["k1", "k2", "k3"], "n1")
    lost.add("n1")
    assert journal.begin("b", ["k1", "k2", "k3"], "n2") is True
    assert journal.start_row("b", "k1") and journal.start_row("b", "k2")
    lost.add("n2")
    assert journal.begin("b", ["k1", "k2", "k3"], "n3") is True
    # a batch of one row whose node is lost twice is not blamed either
    journal.begin("one", ["k9"], "n3")
    lost.add("n3")
    journal.begin("one", ["k9"], "n4")
    lost.add("n4")
    journal.begin("one", ["k9"], "n5")
    assert not journal.deaths
    assert [journal.start_row("b", k) for k in ("k1", "k2", "k3")] == [True, True, True]
    assert journal.start_row("one", "k9")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_row_that_crashes_the_actor_every_time_ends_as_one_error_row(ray_session, tmp_path):
    prompts = [f"prompt {i}: a small scene" for i in range(11)]
    prompts.insert(6, f"a {POISON} prompt that kills whatever runs it")
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    overrides = job_overrides("stand-in", str(tmp_path / "p.txt"), str(out), CRASHING)
    cfg = load_config(
        None, ["job=synthesize", *overrides, "compute.gpus_per_actor=0", "output.contact_sheet=0"]
    )
    summary = run_job(cfg)

    rows = output_rows(str(out))
    keys = [r["key"] for r in read_prompts(str(tmp_path / "p.txt"))]
    assert sorted(r["key"] for r in rows) == sorted(keys)  # every row exactly once
    failed = [r for r in rows if r["status"] != "ok"]
    assert [r["prompt"] for r in failed] == [prompts[6]]
    assert failed[0]["status"] == "error" and "crashed the model actor repeatedly" in failed[0]["error"]
    assert summary["complete"] and summary["total"]["ok"] == 11 and summary["total"]["failed"] == 1
