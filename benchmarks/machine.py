"""The CPU a benchmark ran on, as its results record it: model, cores and the matrix extensions that
decide what bf16 costs (AMX tiles, AVX-512 BF16 / VNNI), read from /proc/cpuinfo where there is one;
the command and the git state of the code measured."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

#: the cpuinfo flags that change what a bf16 matmul costs on a CPU
MATRIX_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f")


def cpu() -> str:
    """E.g. ``AMD EPYC, 2 cores, avx512_bf16 avx512_vnni avx512f, no AMX``."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    matrix = [f for f in MATRIX_FLAGS if f in flags]
    amx = "" if "amx_tile" in flags else ", no AMX"
    return f"{model}, {os.cpu_count()} cores, {' '.join(matrix) or 'no AVX-512'}{amx}"


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces a run of ``module`` (``argv``: its arguments, None for the process's)."""
    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def git_state() -> str:
    """Commit of the checkout, and whether janus/ has uncommitted edits (the engine under test)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "janus"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted janus/ edits" if dirty else "")
