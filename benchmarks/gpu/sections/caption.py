"""caption: captioning images/s of the 1B and 7B shapes at two batches, greedy, 128 new tokens,
against DeepSeek's per-image path."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.gpu.device import free_memory, timed_with_memory
from benchmarks.gpu.models import model_item
from benchmarks.gpu.plan import Plan
from benchmarks.gpu.record import Recorder
from benchmarks.gpu.section import Section


@dataclass(frozen=True)
class CaptionWork:
    shapes: tuple[str, ...]
    batches: tuple[int, ...]
    tokens: int
    reference_images: int  # DeepSeek's per-image loop: its rate is per image, a few suffice


GPU_WORK = CaptionWork(shapes=("1b", "7b"), batches=(32, 64), tokens=128, reference_images=4)
DRY_WORK = CaptionWork(shapes=("tiny48",), batches=(2,), tokens=8, reference_images=1)


def section_caption(rec: Recorder, plan: Plan, work: Path) -> None:
    w = plan.pick(GPU_WORK, DRY_WORK)
    rec.set(
        "measured",
        f"greedy, {w.tokens} new tokens (random weights never stop early), PIL images of 4 sizes "
        "preprocessed inside the call; engine: the whole batch in one call after a batch-1 warm-up; "
        f"ref_per_image: DeepSeek's per-image generate on {w.reference_images} images "
        "(its rate is per image)",
    )
    table: list[dict] = []
    for shape in w.shapes:
        caption_shape(rec, plan, work, shape, table)
        free_memory()


def caption_shape(rec: Recorder, plan: Plan, work: Path, shape: str, table: list[dict]) -> None:
    """One shape's captioning items; ``table`` (the section's) gets its rows."""
    import torch

    from benchmarks.bench_engines import (
        QUESTIONS,
        add_ratios,
        caption_contenders,
        caption_images,
        caption_row,
        param_bytes,
        run_interleaved,
    )

    w = plan.pick(GPU_WORK, DRY_WORK)
    device = torch.device(plan.device)
    built = model_item(rec, shape, plan, device, work)
    if built is None:
        return
    model, processor, facts = built
    lm = model.language_model
    decode_bytes = param_bytes(lm.model.layers, lm.model.norm, lm.lm_head)
    common = {
        "device": str(device),
        "dtype": plan.dtype,
        "config": shape,
        "model_shape": facts["model_shape"],
    }
    images = caption_images(max(w.batches))
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(len(images))]
    contenders = caption_contenders(model, processor, images, questions, w.tokens)
    rows: list = []

    def measure(name: str, n: int) -> dict[str, Any]:
        idx = list(range(n))
        fn = contenders[name]
        first = plan.warmups and not any(r.contender == name for r in rows)
        warm = {name: lambda: fn(idx[:1])} if first else {}
        runs = run_interleaved({name: timed_with_memory(lambda: fn(idx), device)}, warm, plan.repeats, device)
        times, infos = runs[name]
        row = caption_row(name, times, infos, n, decode_bytes, w.tokens, common)
        row.extra["memory"] = infos[times.index(min(times))].get("memory")
        rows.append(row)
        add_ratios(rows, "ref_per_image")
        table[:] = [t for t in table if t["shape"] != shape] + [
            {
                "shape": shape,
                "contender": r.contender,
                "batch": r.batch,
                "images_per_s": r.images_per_s,
                "x_reference": r.ratio_vs_reference,
                "decode_tokens_per_s": r.decode_tokens_per_s,
                "bandwidth_gb_s": r.bandwidth_gb_s,
                "prefill_s": r.extra.get("prefill_s"),
                "decode_s": r.extra.get("decode_s"),
                "peak_gib": (r.extra.get("memory") or {}).get("peak_gib"),
            }
            for r in rows
        ]
        rec.set("table", table)
        return asdict(row)

    scale = {"7b": 2.0}.get(shape, 1.0)
    for b in w.batches:
        rec.item(f"{shape} engine B={b}", lambda b=b: measure("engine", b), scale * (2 + b * 0.04))
    n_ref = w.reference_images
    rec.item(
        f"{shape} ref_per_image on {n_ref}", lambda: measure("ref_per_image", n_ref), scale * n_ref * 2.5
    )


SECTIONS = (
    Section(
        "caption",
        order=50,
        budget_s=35,
        about="captioning images/s, 1B and 7B shapes, batch 32/64, 128 new tokens",
        run=section_caption,
    ),
)
