"""The GPU suite's command: ``python -m benchmarks.gpu_suite --help`` lists its sections.

    bash benchmarks/gpu_suite.sh                  # on the lent GPU machine: install the carried wheels, run
    python -m benchmarks.gpu_suite [--out DIR] [--only synthesis_1b,serve] [--budget-scale 1.0]
    python -m benchmarks.gpu_suite --dry-run      # the whole suite on the CPU with the tiny model

The suite lives in ``benchmarks/gpu/``: the runner (budgets, processes, records) and one module per
section in ``benchmarks/gpu/sections/``.
"""

from __future__ import annotations

from benchmarks.gpu.plan import DRY_PLAN, GPU_PLAN, Plan
from benchmarks.gpu.record import Recorder
from benchmarks.gpu.runner import SECTIONS, main
from benchmarks.gpu.section import Section

__all__ = ["DRY_PLAN", "GPU_PLAN", "SECTIONS", "Plan", "Recorder", "Section", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
