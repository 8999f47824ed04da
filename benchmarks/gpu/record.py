"""One section's record: a JSON file rewritten after every item, so a killed section keeps what it
measured, and strict JSON (no NaN) that any reader takes."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.gpu.device import free_memory
from benchmarks.gpu.plan import Plan


def _finite(value: Any) -> Any:
    """NaN and infinities become null, so the files are strict JSON for any reader."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    """json.dumps fallback: numpy and torch scalars / arrays, paths, anything else as text."""
    if hasattr(value, "tolist"):
        return _finite(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader (or a kill) never sees half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, default=_jsonable, allow_nan=False) + "\n")
    os.replace(tmp, path)


class Recorder:
    """One section's JSON, rewritten after every item so that a killed section keeps what it measured."""

    def __init__(self, path: Path, section: str, budget_s: float | None, plan: Plan):
        self.path = path
        self.t0 = time.perf_counter()
        self.deadline = math.inf if budget_s is None else self.t0 + budget_s
        self.data: dict[str, Any] = {
            "section": section,
            "status": "running",
            "mode": "dry-run (CPU, tiny model)" if plan.device == "cpu" else "gpu",
            "budget_s": budget_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "items": [],
        }
        self.write()

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def timeout(self, cap_s: float = 900.0) -> float:
        """Seconds a wait may take: what is left of the budget, and never unbounded (a dry run has none)."""
        return max(min(self.left(), cap_s), 1.0)

    def item(self, name: str, fn: Callable[[], Any], est_s: float = 0.0) -> Any:
        """Run one measurement; its result, its failure (with traceback) or its skip is recorded."""
        entry: dict[str, Any] = {"name": name, "est_s": round(est_s, 1)}
        result = None
        if self.left() < est_s:
            entry.update(
                status="skipped", reason=f"needs ~{est_s:.0f} s; {self.left():.0f} s of the budget left"
            )
        else:
            print(f"[{self.data['section']}] {name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                result = fn()
                entry.update(status="ok", result=result)
            except Exception as exc:  # recorded; the section goes on with its next item
                entry.update(
                    status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
                )
                print(entry["traceback"], file=sys.stderr, flush=True)
                free_memory()
            entry["wall_s"] = round(time.perf_counter() - t0, 2)
            print(f"[{self.data['section']}] {name}: {entry['status']} in {entry['wall_s']} s", flush=True)
        self.data["items"].append(entry)
        self.write()
        return result

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.write()

    def finish(self, status: str | None = None) -> None:
        states = {i["status"] for i in self.data["items"]}
        self.data["status"] = status or (
            "failed" if "failed" in states else "partial" if "skipped" in states else "ok"
        )
        self.data["wall_s"] = round(time.perf_counter() - self.t0, 2)
        self.write()

    def write(self) -> None:
        write_json(self.path, self.data)
