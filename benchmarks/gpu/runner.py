"""One prepared GPU run that measures the product where it runs (H100/H200), in about 8 minutes.

    bash benchmarks/gpu_suite.sh                  # on the lent GPU machine: install the carried wheels, run
    python -m benchmarks.gpu_suite [--out DIR] [--only synthesis_1b,serve] [--budget-scale 1.0]
    python -m benchmarks.gpu_suite --dry-run      # the whole suite on the CPU with the tiny model

A GPU is lent rarely and briefly, so everything is decided here and one call measures it all.
Sections, in order (one module each in benchmarks/gpu/sections); on the GPU each runs in its own
process under a time budget, a failure is recorded with its traceback and the next section runs:

{sections}

Every section rewrites <out>/<section>.json after each item, so a section that is killed keeps what it
measured; <out>/summary.json says what ran, what failed, how long each section took, checks the goals,
and holds every section's record (the device returns at most 8 files of $OUT).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.gpu.plan import DRY_PLAN, GPU_PLAN, Plan
from benchmarks.gpu.processes import ROOT, product_env
from benchmarks.gpu.record import Recorder, write_json
from benchmarks.gpu.section import Section
from benchmarks.gpu.sections import discover
from benchmarks.machine import command_line

ALL: dict[str, Section] = discover()
SECTIONS = tuple(ALL)
GRACE_S = 10  # after its budget a section's process gets SIGTERM, and SIGKILL this much later


def usage() -> str:
    listing = "\n".join(
        textwrap.fill(
            s.about,
            104,
            break_on_hyphens=False,
            initial_indent=f"  {s.name:13s} ",
            subsequent_indent=" " * 16,
        )
        for s in ALL.values()
    )
    total = sum(s.budget_s for s in ALL.values())
    return __doc__.format(sections=f"{listing}\n\nBudgets on the GPU: {total:.0f} s in all.")


def run_section(name: str, plan: Plan, out: Path, work: Path, budget_s: float | None) -> None:
    """One section in this process; its JSON is final when this returns (or says why it is not)."""
    rec = Recorder(out / f"{name}.json", name, budget_s, plan)
    if plan.device == "cpu":  # a second OpenMP thread on a shared 2-core machine stalls 10x or more
        import torch

        torch.set_num_threads(1)
    try:
        ALL[name].run(rec, plan, work)
    except BaseException as exc:  # a section-level failure (or SIGTERM at its budget) is recorded too
        rec.set("error", f"{type(exc).__name__}: {exc}")
        rec.set("traceback", traceback.format_exc())
        rec.finish("timeout" if isinstance(exc, SystemExit) else "failed")
        if not isinstance(exc, Exception):
            raise
        return
    rec.finish()


def run_isolated(name: str, out: Path, work: Path, budget_s: float | None, dry_run: bool) -> None:
    """One section in its own process: a hard time limit, and a crash or a poisoned CUDA context
    stays inside it. SIGTERM at the budget (the section records it), SIGKILL ``GRACE_S`` later."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--section", name]
    cmd += ["--out", str(out), "--work", str(work)]
    cmd += ["--dry-run"] if dry_run else []
    cmd += [] if budget_s is None else ["--budget-s", str(budget_s)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=product_env(), start_new_session=True)
    try:
        code = proc.wait(None if budget_s is None else budget_s + GRACE_S / 2)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(GRACE_S / 2)
        except subprocess.TimeoutExpired:
            code = None
    with contextlib.suppress(ProcessLookupError):  # its children too (a job, a server)
        os.killpg(proc.pid, signal.SIGKILL)
    path = out / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"section": name, "items": [], "budget_s": budget_s}
    if data.get("status") in (None, "running"):
        data["status"] = "timeout" if code is None else f"crashed (exit code {code})"
        write_json(path, data)


def read_record(out: Path, name: str) -> dict[str, Any]:
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


def goals(out: Path, sections: list[str]) -> list[dict[str, Any]]:
    """The compass: each section that ran and has goals checks them against its record."""
    checks: list[dict[str, Any]] = []
    for name in sections:
        if ALL[name].goals is not None:
            checks += ALL[name].goals(read_record(out, name))
    return checks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_suite",
        description=usage(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", help="default: $OUT, else benchmarks/results/gpu_suite (out/gpu_suite_dry_run)")
    ap.add_argument(
        "--summary",
        help="where summary.json goes (default: in --out); it holds every section's record, so a caller "
        "that can take back only a few files needs this one alone",
    )
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    ap.add_argument("--dry-run", action="store_true", help="the whole suite on the CPU with the tiny model")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every section's budget")
    ap.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each section in its own process (default: on the GPU yes, in --dry-run no)",
    )
    ap.add_argument(
        "--work", default=None, help="scratch directory (checkpoints, job output); default: a temp dir"
    )
    ap.add_argument("--section", help=argparse.SUPPRESS)  # internal: run this one section here
    ap.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.selected = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.selected) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    default = "out/gpu_suite_dry_run" if args.dry_run else "benchmarks/results/gpu_suite"
    out = Path(args.out or os.environ.get("OUT") or default).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.section:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a budget's end: record, then stop
        run_section(args.section, plan, out, Path(args.work), args.budget_s)
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA device here; use --dry-run on a CPU machine", file=sys.stderr)
            return 2
    isolate = (not args.dry_run) if args.isolate is None else args.isolate
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="janus-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    summary: dict[str, Any] = {
        "mode": "dry-run (CPU, tiny model)" if args.dry_run else "gpu",
        "command": command_line("benchmarks.gpu_suite", argv),
        "isolated": isolate,
        "sections": {},
    }
    summary_path = Path(args.summary).resolve() if args.summary else out / "summary.json"
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_all(args, plan, out, work, isolate, summary, summary_path)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    summary["goals"] = goals(out, list(summary["sections"]))
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json(summary_path, summary)
    print_summary(summary, out)
    return 0


def run_all(
    args: argparse.Namespace, plan: Plan, out: Path, work: Path, isolate: bool, summary: dict, summary_path: Path
) -> None:
    """The selected sections in order, each with its budget plus what the one before left unused;
    ``summary.json`` is rewritten after each."""
    t_start = time.perf_counter()
    slack = 0.0
    for name in [s for s in SECTIONS if s in args.selected]:
        budget = max(ALL[name].budget_s * args.budget_scale + slack, 0.0) if plan.budgets else None
        t0 = time.perf_counter()
        print(f"=== {name} ({'no budget' if budget is None else f'budget {budget:.0f} s'}) ===", flush=True)
        if isolate:
            run_isolated(name, out, work, budget, args.dry_run)
        else:
            run_section(name, plan, out, work, budget)
        wall = time.perf_counter() - t0
        slack = 0.0 if budget is None else budget - wall
        data = read_record(out, name)
        states = [i["status"] for i in data.get("items", [])]
        summary["sections"][name] = {
            "status": data.get("status"),
            "wall_s": round(wall, 1),
            "budget_s": None if budget is None else round(budget, 1),
            "file": f"{name}.json",
            **{f"items_{s}": states.count(s) for s in ("ok", "failed", "skipped")},
            "record": data,
        }
        summary["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_json(summary_path, summary)


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """A short table last: the device tool returns the end of the output."""
    print(f"\n=== gpu_suite summary ({summary['mode']}, {summary['wall_s']} s) -> {out} ===")
    for name, s in summary["sections"].items():
        print(
            f"{name:13s} {s['status']:10s} {s['wall_s']:7.1f} s of {s['budget_s'] or '-':>5}  "
            f"ok {s['items_ok']}  failed {s['items_failed']}  skipped {s['items_skipped']}"
        )
    for name, s in summary["sections"].items():
        for t in s["record"].get("table") or []:
            if "images_per_s" not in t:
                continue
            ratios = "  ".join(
                f"{k} {t[k]:.2f}"
                for k in ("x_reference", "x_transformers", "speedup", "pass_cost_ratio")
                if t.get(k) is not None
            )
            who = t.get("contender") or t.get("method", "")
            print(
                f"  {name:12s} {t.get('shape', ''):4s} {who:15s} B={t['batch']:<4d}"
                f"{t['images_per_s']:8.2f} img/s  {ratios}"
            )
    for g in summary.get("goals", []):
        print(f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}: {g['measured']}")
