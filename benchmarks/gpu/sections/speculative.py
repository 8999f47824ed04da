"""speculative: what a speculative pass costs on the GPU against a plain one, at the 1B and 7B shapes.

Random weights accept drafts for reasons that say nothing about a trained model, so what this section
measures is the cost side: seconds per forward pass of a W-code window against a one-code pass at
batch 1, 4 and 16 (on a GPU a pass is memory-bound, so a window should cost little more), and images/s
and passes per image of plain, jacobi and coupled as they come. A trained model's codes per pass
(``benchmarks/bench_speculative.py`` on the shapes model) times this cost ratio is the speed-up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.gpu.device import free_memory
from benchmarks.gpu.models import model_item
from benchmarks.gpu.plan import Plan
from benchmarks.gpu.record import Recorder
from benchmarks.gpu.section import Section

WINDOW = 16
METHODS = ("off", "jacobi", "coupled")
#: (shape, batches) on the GPU; the dry run's code is the same on the tiny model
SHAPES_GPU = (("1b", (1, 4, 16)), ("7b", (1, 4, 16)))
SHAPES_DRY = (("tiny48", (1, 2)),)


def measure(model, processor, method: str, batch: int, device) -> dict[str, Any]:
    import torch

    from benchmarks.bench_engines import PROMPTS
    from janus.engine import SynthesisEngine

    spec = None if method == "off" else {"method": method, "window": WINDOW}
    engine = SynthesisEngine(model, processor, max_batch_size=batch, speculative=spec)
    requests = [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(batch)]
    engine.generate(requests[:1])  # warm-up: kernels at batch 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - t0
    passes = max(r.decode_passes for r in results)  # the batch runs until its slowest request ends
    decode_s = results[0].timings.get("decode_s", seconds)
    return {
        "method": method,
        "batch": batch,
        "images_per_s": round(batch / seconds, 3),
        "passes_per_image": round(sum(r.decode_passes for r in results) / batch, 1),
        "decode_s_per_pass": round(decode_s / max(passes - 1, 1), 6),
        "ok": all(r.ok for r in results),
    }


def section_speculative(rec: Recorder, plan: Plan, work: Path) -> None:
    import torch

    device = torch.device(plan.device)
    rec.set("window", WINDOW)
    rec.set(
        "measured",
        "one warm-up call at batch 1, then one timed call per (method, batch); random weights: the pass "
        "cost ratio is the figure, acceptance is not",
    )
    table: list[dict[str, Any]] = []
    for shape, batches in plan.pick(gpu=SHAPES_GPU, dry=SHAPES_DRY):
        built = model_item(rec, shape, plan, device, work)
        if built is not None:
            shape_items(rec, table, shape, batches, built[0], built[1], device)
        built = None
        free_memory()


def shape_items(rec: Recorder, table: list, shape: str, batches, model, processor, device) -> None:
    """Every (batch, method) item of one shape, recorded as it ends."""
    for batch in batches:
        for method in METHODS:
            row = rec.item(
                f"{shape} {method} B={batch}",
                lambda m=method, b=batch: measure(model, processor, m, b, device),
                {"1b": 6.0, "7b": 12.0}.get(shape, 1.0) * (1 + batch / 8),
            )
            if row is not None:
                table.append({"shape": shape, **row})
                rec.set("table", with_ratios(table))


def with_ratios(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's speed-up and pass-cost ratio against plain decoding at the same shape and batch."""
    plain = {(r["shape"], r["batch"]): r for r in table if r["method"] == "off"}
    out = []
    for r in table:
        base = plain.get((r["shape"], r["batch"]))
        extra = {}
        if base and r["method"] != "off":
            extra = {
                "speedup": round(r["images_per_s"] / base["images_per_s"], 3),
                "pass_cost_ratio": round(r["decode_s_per_pass"] / base["decode_s_per_pass"], 3),
            }
        out.append({**r, **extra})
    return out


SECTIONS = (
    Section(
        "speculative",
        order=45,
        budget_s=90,
        about="speculative decoding's pass cost and images/s against plain, 1B and 7B shapes, batch 1/4/16",
        run=section_speculative,
    ),
)
