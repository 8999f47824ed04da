"""synthesis_1b, synthesis_7b: images/s of full 576-token calls (the VQ decode included) at several
batches, the engine eager and compiled against DeepSeek's loop (one prompt, ``parallel_size`` = batch)
and transformers' Janus generate; decode steps/s, bandwidth achieved and the distance to the
memory-bandwidth floor of the decode steps."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any
from unittest import mock

from benchmarks.gpu.device import free_memory, timed_with_memory
from benchmarks.gpu.models import IMAGE_TOKENS, call_estimate_s, model_item
from benchmarks.gpu.plan import Plan
from benchmarks.gpu.record import Recorder
from benchmarks.gpu.section import Section

#: The compass: per-GPU synthesis goals, checked in summary.json.
GOALS = {"1b_images_per_s": 20.0, "7b_images_per_s": 7.0, "x_reference": 3.0, "x_transformers": 2.0}
CONTENDERS = ["engine", "ref_parallel", "hf", "engine_compiled"]
#: The 1B items in priority order: batch 16 side by side first, then the compiled engine at its best
#: batch (the first compile pays ~1 minute), batch 64, and what a short budget can drop last.
SYNTHESIS_1B = [
    (16, "engine"),
    (16, "ref_parallel"),
    (16, "hf"),
    (128, "engine_compiled"),
    (64, "engine"),
    (64, "ref_parallel"),
    (64, "hf"),
    (128, "engine"),
    (16, "engine_compiled"),
    (64, "engine_compiled"),
    (128, "ref_parallel"),
    (128, "hf"),
]
SYNTHESIS_7B = [(b, c) for b in (16, 64) for c in ("engine", "ref_parallel", "hf")] + [
    (64, "engine_compiled")
]
#: (batch, contender) in priority order, per section: on the GPU, and in the dry run (every contender
#: once; the 7B section's code is the 1B one's)
ITEMS = {
    "synthesis_1b": {"gpu": SYNTHESIS_1B, "dry": [(2, c) for c in CONTENDERS]},
    "synthesis_7b": {"gpu": SYNTHESIS_7B, "dry": [(2, "engine")]},
}
SHAPES = {"synthesis_1b": "1b", "synthesis_7b": "7b"}
#: Rough GPU seconds of a first compile + CUDA-graph capture of the decode step; later batch sizes
#: recompile (dynamo then marks the batch dynamic) in about half.
COMPILE_EST_S = {"1b": 70.0, "7b": 100.0}
HF_BUILD_EST_S = {"1b": 10.0, "7b": 25.0}


def measured_ceilings(out: Path) -> dict[str, Any]:
    """The environment section's copy bandwidth (bytes/s), else the H200 datasheet's, labelled."""
    try:
        items = json.loads((out / "environment.json").read_text())["items"]
        copy = next(i for i in items if i["name"] == "copy bandwidth" and i["status"] == "ok")
        return {"bytes_per_s": copy["result"]["gb_s"] * 1e9, "source": "measured (environment section)"}
    except (OSError, ValueError, KeyError, StopIteration):
        return {
            "bytes_per_s": 4.8e12,
            "source": "H200 datasheet (4.8 TB/s): the environment section did not run",
        }


def llm_floor_s(model, prompt_len: int, batch: int, decode_bytes: int, bandwidth: float) -> float:
    """Least time of the 576 steps if only memory mattered: every step reads the decode weights once
    and the 2B rows' KV cache prefix (prompt + tokens so far), at the measured copy bandwidth."""
    lc = model.language_model.config
    heads = lc.num_key_value_heads
    head_dim = getattr(lc, "head_dim", None) or lc.hidden_size // lc.num_attention_heads
    elem = next(model.language_model.parameters()).element_size()
    per_position = 2 * lc.num_hidden_layers * 2 * batch * heads * head_dim * elem  # K and V, 2B rows
    positions = sum(prompt_len + s for s in range(IMAGE_TOKENS))
    return (IMAGE_TOKENS * decode_bytes + per_position * positions) / bandwidth


def dynamo_counters() -> dict[str, dict[str, int]]:
    from torch._dynamo.utils import counters

    return {group: {str(k)[:200]: int(v) for k, v in c.items()} for group, c in counters.items()}


def counters_delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
    """What a compiled run added: graphs, recompiles, graph breaks, CUDA-graph skips."""
    out = {}
    for group, c in after.items():
        moved = {k: v - before.get(group, {}).get(k, 0) for k, v in c.items()}
        moved = {k: v for k, v in moved.items() if v}
        if moved:
            out[group] = moved
    return out


def synthesis_table(rows: list, reference: str, floors: dict[tuple[int, str], float]) -> list[dict]:
    """Ratios at the same batch (vs ``reference`` and transformers), and the distance to the floor."""
    from benchmarks.bench_engines import add_ratios

    table = []
    for b in sorted({r.batch for r in rows}):
        group = [r for r in rows if r.batch == b]
        add_ratios(group, reference)
        for r in group:
            floor = floors.get((b, r.contender))
            table.append(
                {
                    "batch": b,
                    "contender": r.contender,
                    "images_per_s": r.images_per_s,
                    "x_reference": r.ratio_vs_reference,
                    "x_transformers": r.ratio_vs_hf,
                    "decode_steps_per_s": r.steps_per_s,
                    "bandwidth_gb_s": r.bandwidth_gb_s,
                    "llm_s": r.llm_s,
                    "vq_decode_s": r.extra.get("vq_decode_s"),
                    "peak_gib": (r.extra.get("memory") or {}).get("peak_gib"),
                    "llm_floor_s": floor,
                    "llm_s_over_floor": r.llm_s / floor if floor else None,
                }
            )
    return table


def section_synthesis(rec: Recorder, plan: Plan, work: Path, section: str) -> None:
    import torch

    if plan.device == "cpu":
        with mock.patch.object(torch, "compile", eager_backend(torch.compile)):
            return synthesis_items(rec, plan, work, section)
    torch._logging.set_logs(perf_hints=True, recompiles=True, graph_breaks=True)  # why a graph was skipped
    return synthesis_items(rec, plan, work, section)


def eager_backend(compile_: Callable) -> Callable:
    """torch.compile for the dry run: dynamo traces the step as on the GPU (fullgraph, so a graph
    break fails here too), but the eager backend runs it: inductor's CPU build takes minutes here."""

    def compile_eagerly(fn, **kwargs):
        kwargs.pop("mode", None)
        return compile_(fn, **{**kwargs, "backend": "eager"})

    return compile_eagerly


def synthesis_items(rec: Recorder, plan: Plan, work: Path, section: str) -> None:
    import torch

    from benchmarks.bench_engines import (
        PROMPTS,
        param_bytes,
        run_interleaved,
        sync,
        synthesis_contenders,
        synthesis_row,
    )
    from benchmarks.hf_baseline import hf_janus_from_model
    from janus.reference import reference_generate, t2i_prompt

    device = torch.device(plan.device)
    shape = plan.pick(gpu=SHAPES[section], dry="tiny48")
    built = model_item(rec, shape, plan, device, work)
    if built is None:
        return
    model, processor, facts = built
    lm = model.language_model
    decode_bytes = param_bytes(lm.model.layers, lm.model.norm, model.gen_head, model.gen_aligner)
    common = {
        "device": str(device),
        "dtype": plan.dtype,
        "config": shape,
        "model_shape": facts["model_shape"],
        "_device": device,
    }
    bandwidth = measured_ceilings(rec.path.parent)
    rec.set("decode_bytes", decode_bytes)
    rec.set("bandwidth_for_floor", bandwidth)
    rec.set(
        "measured",
        "each contender: full 576-token calls with the VQ decode, after a warm-up (the compiled engine's "
        f"warm-up is a full call at the same batch: compile + CUDA-graph capture), then {plan.repeats} timed "
        "call(s), best kept; ref_parallel = DeepSeek's loop on ONE prompt with parallel_size = batch; "
        "hf = transformers' Janus generate on the batch's prompts",
    )
    rows: list = []
    floors: dict[tuple[int, str], float] = {}
    warmed: set[str] = set()
    hf_cache: dict[str, Any] = {}

    def hf_model():
        if "hf" not in hf_cache:
            t0 = time.perf_counter()
            try:
                hf_cache["hf"] = hf_janus_from_model(model, processor)
            except Exception as exc:
                hf_cache["hf"] = exc
                raise
            rec.set("transformers_build_s", time.perf_counter() - t0)
        if isinstance(hf_cache["hf"], Exception):
            raise RuntimeError("transformers' Janus could not be built: see the first hf item")
        return hf_cache["hf"]

    def measure(batch: int, contender: str) -> dict[str, Any]:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        base = "engine" if contender.startswith("engine") else contender
        args = argparse.Namespace(
            device=plan.device, vq_batch=8, compile=contender == "engine_compiled", contenders={base}
        )
        hf = hf_model() if base == "hf" else None
        fn = synthesis_contenders(model, processor, prompts, args, hf=hf)[base]
        if not plan.warmups:
            warmup = None
        elif contender == "engine_compiled":
            warmup = lambda: fn(prompts)  # noqa: E731  compile and capture at this very batch
        elif contender in warmed:
            warmup = None
        elif contender == "ref_parallel":
            warmup = lambda: reference_generate(  # noqa: E731  its kernels at this batch, 16 tokens
                model, processor, prompts[0], parallel_size=batch, image_tokens=16
            )
        else:
            warmup = lambda: fn(prompts[:1])  # noqa: E731
        warmed.add(contender)
        before = dynamo_counters()
        warm_s = None
        if warmup is not None:
            t0 = time.perf_counter()
            warmup()
            sync(device)
            warm_s = time.perf_counter() - t0
        runs = run_interleaved(
            {contender: timed_with_memory(lambda: fn(prompts), device)}, {}, plan.repeats, device
        )
        times, infos = runs[contender]
        row = synthesis_row(contender, times, infos, batch, decode_bytes, common)
        best = infos[times.index(min(times))]
        row.extra.update(warmup_s=warm_s, memory=best.get("memory"))
        if contender == "engine_compiled":
            row.extra["compile_counters"] = counters_delta(before, dynamo_counters())
        rows.append(row)
        prompt_len = max(len(processor.tokenizer.encode(t2i_prompt(processor, p))) for p in prompts)
        floors[(batch, contender)] = llm_floor_s(
            model, prompt_len, batch, decode_bytes, bandwidth["bytes_per_s"]
        )
        rec.set("table", synthesis_table(rows, "ref_parallel", floors))
        return {k: v for k, v in asdict(row).items() if k not in ("device", "dtype", "config", "model_shape")}

    compiled_before = False
    for batch, contender in ITEMS[section]["gpu" if plan.gpu else "dry"]:
        est = call_estimate_s(shape, contender, batch) * (1 + plan.repeats)
        if contender == "engine_compiled":
            est += COMPILE_EST_S.get(shape, 0.0) / (2 if compiled_before else 1)
            compiled_before = True
        if contender == "hf" and "hf" not in hf_cache:
            est += HF_BUILD_EST_S.get(shape, 0.0)
        rec.item(f"{contender} B={batch}", lambda b=batch, c=contender: measure(b, c), est)
        free_memory()


def goals(section: str, key: str) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """The compass for one synthesis section, read off its record's table: the engine's best images/s,
    and its ratios to DeepSeek's loop and to transformers at every batch."""

    def check(record: dict[str, Any]) -> list[dict[str, Any]]:
        engines = [t for t in record.get("table") or [] if t["contender"].startswith("engine")]
        best = max(engines, key=lambda t: t["images_per_s"], default=None)
        checks = [
            {
                "goal": f"{section}: engine >= {GOALS[key]} images/s at the best batch",
                "measured": best and {k: best[k] for k in ("batch", "contender", "images_per_s")},
                "met": bool(best and best["images_per_s"] >= GOALS[key]),
            }
        ]
        for ratio in ("x_reference", "x_transformers"):
            batches = sorted({t["batch"] for t in engines if t[ratio] is not None})
            at = {
                b: max(t[ratio] for t in engines if t["batch"] == b and t[ratio] is not None) for b in batches
            }
            checks.append(
                {
                    "goal": f"{section}: engine >= {GOALS[ratio]}x {ratio[2:]} at the same batch",
                    "measured": at or None,
                    "met": bool(at) and all(v >= GOALS[ratio] for v in at.values()),
                }
            )
        return checks

    return check


SECTIONS = (
    Section(
        "synthesis_1b",
        order=30,
        budget_s=170,
        about="images/s at batch 16/64/128, compile off and on, against DeepSeek's loop (one prompt, "
        "parallel_size = batch) and transformers' Janus generate",
        run=lambda rec, plan, work: section_synthesis(rec, plan, work, "synthesis_1b"),
        goals=goals("synthesis_1b", "1b_images_per_s"),
    ),
    Section(
        "synthesis_7b",
        order=40,
        budget_s=80,
        about="the same at the 7B shape, batch 16/64",
        run=lambda rec, plan, work: section_synthesis(rec, plan, work, "synthesis_7b"),
        goals=goals("synthesis_7b", "7b_images_per_s"),
    ),
)
