"""What a batch job's exit code means, and the one line on stderr that says why when it is not 0.

A job judges its whole output (``summary["total"]``), not only the rows of this run: a rerun of a
finished job runs nothing and reports what the output holds.
"""

from __future__ import annotations

import json
from typing import Any

DONE, INCOMPLETE, NOTHING_RAN, ROWS_FAILED = 0, 1, 2, 3

#: the codes as ``--help`` and README.md list them
EXIT_CODES = f"""exit codes:
  {DONE}  done: every input row has its output row, and at most max_failed_fraction of them failed
  {INCOMPLETE}  the job ran but did not complete (storage failed, duplicate keys): rerun the same
     command to resume
  {NOTHING_RAN}  nothing ran: the command, the configuration or the input is wrong (an input without
     any prompt or image included); one line on stderr
  {ROWS_FAILED}  the job completed, but no row succeeded, or more than max_failed_fraction of its rows
     failed (status error); the summary is still printed, and the reasons are in the error column
"""


def verdict(summary: dict[str, Any], max_failed_fraction: float) -> tuple[int, str | None]:
    """(exit code, the line that says why, or None) of a job that ran and printed ``summary``."""
    total = summary["total"]
    count, ok, failed = total["count"], total["ok"], total["failed"]
    if not summary["complete"]:
        return INCOMPLETE, (
            f"{summary['duplicate_keys']} key(s) appear in more than one committed shard of {summary['output']}"
        )
    if count == 0:
        what = "prompt" if summary["job"] == "synthesize" else "image"
        return NOTHING_RAN, f"input.url: the input holds no {what}: there was no row to run"
    counts = f"{ok} ok, {failed} failed, {total.get('filtered', 0)} filtered of {count} rows in {summary['output']}"
    if ok == 0:
        return ROWS_FAILED, f"no row succeeded ({counts}); the error column says why"
    if failed / count > max_failed_fraction:
        return ROWS_FAILED, (
            f"{failed / count:.1%} of the rows failed, above max_failed_fraction {max_failed_fraction} "
            f"({counts}); the error column says why"
        )
    return DONE, None


def summary_text(summary: dict[str, Any]) -> str:
    """The summary as JSON with one top-level key a line: a screen's worth, and still one JSON value."""
    items = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, default=str)}" for k, v in summary.items())
    return "{\n" + items + "\n}"
