"""Exit codes that mean something: an empty input, a job in which no row succeeded, and a job with
more failed rows than ``max_failed_fraction`` allows do not end with 0 (``jobs/outcome.py``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.cli import main as cli_main
from jobs.outcome import DONE, INCOMPLETE, NOTHING_RAN, ROWS_FAILED, summary_text, verdict
from tests.support import REPO
from tests.support.jobs import cli_summary, job_overrides

STAND_IN = "compute.actor_class=tests.support.scale_actors:StandInSynthesizer"
REJECTING = "compute.actor_class=tests.support.scale_actors:RejectingStandInSynthesizer"


def summary(ok: int, failed: int, filtered: int = 0, duplicates: int = 0, job: str = "synthesize") -> dict:
    count = ok + failed + filtered
    return {
        "job": job,
        "output": "out/x",
        "this_run": {"count": 0},  # a rerun that had nothing left to do: the output is what counts
        "total": {"count": count, "ok": ok, "failed": failed, "filtered": filtered},
        "duplicate_keys": duplicates,
        "complete": not duplicates,
    }


def test_the_verdict_judges_the_whole_output():
    assert verdict(summary(ok=9, failed=1), 1.0) == (DONE, None)
    assert verdict(summary(ok=9, failed=1), 0.1) == (DONE, None)  # 10% is not above 10%
    code, why = verdict(summary(ok=8, failed=2), 0.1)
    assert code == ROWS_FAILED and "20.0% of the rows failed, above max_failed_fraction 0.1" in why
    code, why = verdict(summary(ok=0, failed=5), 1.0)  # whatever max_failed_fraction says
    assert code == ROWS_FAILED and why.startswith("no row succeeded (0 ok, 5 failed, 0 filtered of 5 rows")
    code, why = verdict(summary(ok=0, failed=0, filtered=3), 1.0)  # nothing passed the quality filter
    assert code == ROWS_FAILED and "3 filtered" in why
    code, why = verdict(summary(ok=0, failed=0, job="caption"), 1.0)
    assert code == NOTHING_RAN and "holds no image" in why
    assert verdict(summary(ok=3, failed=0, duplicates=2), 1.0)[0] == INCOMPLETE


def test_the_summary_prints_one_key_a_line_and_parses_back():
    s = {**summary(ok=9, failed=1), "skipped_inputs": {"count": 0, "examples": []}, "contact_sheet": "out/x/c.png"}
    text = summary_text(s)
    assert cli_summary(f"ray's lines before it\n{text}\nand after it") == s
    assert len(text.splitlines()) == len(s) + 2


def test_help_lists_the_exit_codes():
    for argv in ([], ["synthesize"], ["caption"]):
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *argv, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        for code in (DONE, INCOMPLETE, NOTHING_RAN, ROWS_FAILED):
            assert f"\n  {code}  " in proc.stdout, proc.stdout


def test_an_input_without_prompts_is_one_line_and_code_2(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes(b"")
    code = cli_main(["synthesize", "--set", f"input.url={tmp_path}", "--set", f"output.url={tmp_path / 'out'}"])
    captured = capsys.readouterr()
    assert code == NOTHING_RAN and not captured.out
    assert captured.err.count("\n") == 1 and "holds no prompts: its 2 file(s) are empty" in captured.err


def _run(overrides: list[str], capsys) -> tuple[int, dict | None, str]:
    code = cli_main(["synthesize", *(a for o in overrides for a in ("--set", o))])
    captured = capsys.readouterr()
    printed = cli_summary(captured.out) if captured.out.strip() else None
    last = captured.err.strip().splitlines()[-1] if captured.err.strip() else ""
    return code, printed, last


@pytest.mark.timeout(1200)
def test_failed_rows_decide_the_exit_code(ray_session, tmp_path, capsys):
    """Model-free stand-ins on the session's Ray: every row rejected is code 3 with the summary still
    printed; 2 error rows in 6 pass by default and fail the job above max_failed_fraction 0.25."""
    (tmp_path / "p.txt").write_text("a red circle\n\na blue square\nthe sea\n\nthe sky\n")  # 2 empty lines
    common = ("compute.gpus_per_actor=0", "output.contact_sheet=0")

    overrides = job_overrides("stand-in", str(tmp_path / "p.txt"), str(tmp_path / "none"), REJECTING, *common)
    code, printed, last = _run(overrides, capsys)
    assert code == ROWS_FAILED and printed["total"] == {"shards": 2, "count": 6, "ok": 0, "failed": 6, "filtered": 0}
    assert last.startswith("janus-pipeline: no row succeeded (0 ok, 6 failed, 0 filtered of 6 rows"), last

    some = job_overrides("stand-in", str(tmp_path / "p.txt"), str(tmp_path / "some"), STAND_IN, *common)
    code, printed, last = _run([*some, "max_failed_fraction=0.25"], capsys)
    assert code == ROWS_FAILED and printed["total"]["ok"] == 4 and printed["total"]["failed"] == 2
    assert "33.3% of the rows failed, above max_failed_fraction 0.25" in last, last
    # the same output judged again under the default: nothing left to run, and 2 failed rows in 6 pass
    code, printed, last = _run(some, capsys)
    assert code == DONE and printed["this_run"]["count"] == 0 and printed["total"]["failed"] == 2


@pytest.mark.timeout(30)
def test_serve_stops_on_ctrl_c_even_when_started_with_it_ignored():
    """A shell script's ``janus-pipeline serve &`` (and a test runner's worker) start the server with
    SIGINT ignored; the server takes it back, so Ctrl-C or ``kill -INT`` stop it gracefully (the README
    test stops its servers that way and asserts exit code 0)."""
    import signal

    from jobs import cli

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        cli._stop_on_signals()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
