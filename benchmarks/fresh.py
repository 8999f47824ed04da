"""Memory benchmarks measure each size in a process of its own, started after the data is written: what
the parent allocated to write it must not count, and each size starts from the same baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def measure_in_fresh_process(module: str, root: Path) -> dict:
    """``python -m module --measure root``: the JSON its ``measure`` printed."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "--measure", str(root)], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout)
