"""One prepared GPU run that measures the product where it runs (H100/H200), in about 8 minutes.

    bash benchmarks/gpu_suite.sh                  # on the lent GPU machine: install the carried wheels, run
    python -m benchmarks.gpu_suite [--out DIR] [--only synthesis_1b,serve] [--budget-scale 1.0]
    python -m benchmarks.gpu_suite --dry-run      # the whole script on the CPU with the tiny model

A GPU is lent rarely and briefly, so everything is decided here and one call measures it all.
Sections, in order; on the GPU each runs in its own process under a time budget, a failure is
recorded with its traceback and the next section runs:

  environment   GPU, driver and package versions; the measured copy bandwidth and bf16 matmul rate
  correctness   1B shape, random weights: bf16 vs fp32 on the same weights ("C4": greedy agreement,
                logit max-diff, understanding and 64 image tokens); the engines' equality tests' GPU twin
  synthesis_1b  images/s at batch 16/64/128, compile off and on, against DeepSeek's loop
                (one prompt, parallel_size = batch) and transformers' Janus generate
  synthesis_7b  the same at the 7B shape, batch 16/64
  caption       captioning images/s, 1B and 7B shapes, batch 32/64, 128 new tokens
  ray_data      `python -m jobs.cli synthesize` with one GPU actor against the bare engine loop
  serve         `python -m jobs.cli serve` on a GPU replica: one request per route

Sections 1-3 build random weights of the real shapes directly on the device (the loader's own steps
without the files); ray_data and serve load a checkpoint written to disk, through the loader. Every section
rewrites ``<out>/<section>.json`` after each item, so a section that is killed keeps what it measured;
``<out>/summary.json`` says what ran, what failed, how long each section took, and checks the goals.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "correctness", "synthesis_1b", "synthesis_7b", "caption", "ray_data", "serve")
#: Seconds per section on the GPU (its process's whole life, imports included): 460 s in all, so the
#: suite and the wheel install (~15 s) fit 8 minutes. A section's unused time goes to the next one,
#: and its overrun is taken from it.
BUDGET_S = {
    "environment": 15,
    "correctness": 45,
    "synthesis_1b": 170,
    "synthesis_7b": 80,
    "caption": 35,
    "ray_data": 60,
    "serve": 55,
}
GRACE_S = 10  # after its budget a section's process gets SIGTERM, and SIGKILL this much later
IMAGE_TOKENS = 576
#: The compass: per-GPU synthesis goals, checked in summary.json.
GOALS = {"1b_images_per_s": 20.0, "7b_images_per_s": 7.0, "x_reference": 3.0, "x_transformers": 2.0}


# -- what a mode measures ---------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The real shapes on a GPU; the tiny model on the CPU for ``--dry-run`` (same code, small work)."""

    device: str
    dtype: str  # the production dtype of the throughput sections
    shapes: dict[str, str]  # role -> shape name in ``shape_kwargs``
    synthesis: dict[str, list[tuple[int, str]]]  # section -> (batch, contender) in priority order
    caption_batches: tuple[int, ...]
    caption_tokens: int
    caption_reference_images: int  # DeepSeek's per-image loop: its rate is per image, a few suffice
    twin_dtypes: tuple[str, ...]
    job_rows: int
    job_batch: int
    serve_compile: bool
    repeats: int
    warmups: bool  # warm-up calls before the timed ones (they matter on a GPU, not for a dry run)
    budgets: bool  # False: no time limits at all, every item runs (a dry run checks the code, not time)


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
CONTENDERS = ["engine", "ref_parallel", "hf", "engine_compiled"]


GPU_PLAN = Plan(
    device="cuda",
    dtype="bfloat16",
    shapes={
        "correctness": "1b",
        "synthesis_1b": "1b",
        "synthesis_7b": "7b",
        "ray_data": "1b",
        "serve": "tiny",
    },
    synthesis={"synthesis_1b": SYNTHESIS_1B, "synthesis_7b": SYNTHESIS_7B},
    caption_batches=(32, 64),
    caption_tokens=128,
    caption_reference_images=4,
    twin_dtypes=("float32", "bfloat16"),
    job_rows=64,
    job_batch=32,
    serve_compile=True,
    repeats=1,
    warmups=True,
    budgets=True,
)
DRY_PLAN = Plan(
    device="cpu",
    dtype="float32",
    shapes={
        "correctness": "tiny48",
        "synthesis_1b": "tiny48",
        "synthesis_7b": "tiny48",
        "ray_data": "tiny48",
        "serve": "tiny48",
    },
    synthesis={  # every contender once; the 7B section's code is the 1B one's
        "synthesis_1b": [(2, c) for c in CONTENDERS],
        "synthesis_7b": [(2, "engine")],
    },
    caption_batches=(2,),
    caption_tokens=8,
    caption_reference_images=1,
    twin_dtypes=("float32",),
    job_rows=2,
    job_batch=2,
    serve_compile=False,
    repeats=1,
    warmups=False,
    budgets=False,
)


def shape_kwargs(name: str) -> dict[str, Any]:
    """write_tiny_checkpoint keywords of a shape: bench_engines' configs (1b, 7b, tiny at 384 px), or
    tiny48: the tiny model with a 2-level VQ (48 px), as the engine tests use, which a CPU decodes fast."""
    from benchmarks.bench_engines import CONFIGS

    if name == "tiny48":
        return dict(CONFIGS["tiny"], vq_ch_mult=(1, 2))
    return dict(CONFIGS[name])


def caption_shapes(plan: Plan) -> list[str]:
    return ["1b", "7b"] if plan.device == "cuda" else ["tiny48"]


# -- one section's record ---------------------------------------------------------------------
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


# -- device helpers ---------------------------------------------------------------------------
def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_gib(device) -> dict[str, float] | None:
    """The caching allocator's view: allocated now, and the peak since the last reset."""
    import torch

    if device.type != "cuda":
        return None
    return {
        "allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
    }


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# -- random models of the real shapes, built on the device -------------------------------------
def model_config(shape: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The official ``config.json`` dict of a shape (write_tiny_checkpoint's keywords)."""
    from janus.testing import official_config

    return official_config(
        vocab_size=shape["vocab_size"],
        hidden=shape["hidden"],
        llm_layers=shape["llm_layers"],
        llm_heads=shape["llm_heads"],
        intermediate=shape["intermediate"],
        vision={
            "width": shape["vision_width"],
            "layers": shape["vision_layers"],
            "heads": shape["vision_heads"],
        },
        vq={
            "ch": shape["vq_ch"],
            "ch_mult": list(shape.get("vq_ch_mult", (1, 1, 2, 2, 4))),
            "z_channels": shape["vq_z_channels"],
        },
        dtype=dtype,
    )


def _multimodality_config(cfg: dict[str, Any]):
    from janus.models.configuration import MultiModalityConfig

    return MultiModalityConfig(**{k: v for k, v in cfg.items() if k != "model_type"})


def random_state(cfg: dict[str, Any], dtype: str, device, seed: int = 0) -> dict[str, Any]:
    """Random weights of the shape in ``dtype`` on ``device``, drawn as the tiny checkpoints' are.

    Built in fp32 on the device and cast tensor by tensor: a 7B model is never written to disk nor
    initialised on the host (minutes), and the fp32 copy lives only while the state is drawn.
    """
    import torch

    from janus.models.modeling_vlm import MultiModalityCausalLM
    from janus.testing.checkpoint import _init_tiny_weights

    with torch.device(device):
        model = MultiModalityCausalLM(_multimodality_config(cfg))
    torch.manual_seed(seed)
    _init_tiny_weights(model)
    state = {k: v.detach().to(getattr(torch, dtype)) for k, v in model.state_dict().items()}
    del model
    free_memory()
    return state


def model_from_state(cfg: dict[str, Any], state: dict[str, Any], dtype: str, device):
    """The loader's own steps without the files: meta build, strict assignment of tensors cast to
    ``dtype``, non-persistent buffers (rotary inv_freq) recomputed in fp32 on the device."""
    import torch

    from janus.models.loading import _materialise_non_persistent_buffers
    from janus.models.modeling_vlm import MultiModalityCausalLM

    target = getattr(torch, dtype)
    with torch.device("meta"):
        model = MultiModalityCausalLM(_multimodality_config(cfg))
    cast = {k: v.to(device=device, dtype=target) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    _materialise_non_persistent_buffers(model, torch.device(device))
    model.config.dtype = target
    return model.eval()


def processor_for(work: Path):
    """DeepSeek's processor over the tiny stand-in tokenizer (ids are looked up by string)."""
    from janus.models import VLChatProcessor
    from janus.testing import write_processor_configs, write_tiny_tokenizer

    directory = work / "processor"
    if not (directory / "tokenizer.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        write_tiny_tokenizer(directory)
        write_processor_configs(directory)
    return VLChatProcessor.from_pretrained(directory)


def build_model(shape_name: str, dtype: str, device, work: Path) -> tuple[Any, Any, dict[str, Any]]:
    """(model, processor, facts) for a shape: random weights made on the device, as the loader leaves them."""
    import torch

    from benchmarks.bench_engines import model_shape

    t0 = time.perf_counter()
    cfg = model_config(shape_kwargs(shape_name), dtype)
    model = model_from_state(cfg, random_state(cfg, dtype, device), dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    facts = {
        "shape": shape_name,
        "model_shape": model_shape(model),
        "params": sum(p.numel() for p in model.parameters()),
        "weight_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
        "build_s": time.perf_counter() - t0,
    }
    return model, processor_for(work), facts



def _model_item(rec, shape: str, plan, device, work):
    """Build the random-weight model of ``shape`` on the device as one recorded item:
    (model, processor, facts), or None when the build failed (recorded)."""
    held: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        held["model"], held["processor"], facts = build_model(shape, plan.dtype, device, work)
        return facts

    facts = rec.item(f"{shape} model, random weights on the device", build, 15)
    if facts is None:
        return None
    return held["model"], held["processor"], facts

def write_checkpoint(directory: Path, shape_name: str, dtype: str, device) -> dict[str, Any]:
    """A complete checkpoint in the official layout (safetensors), for the jobs' loader path."""
    from janus.testing import save_state_dict, write_processor_configs, write_tiny_tokenizer

    t0 = time.perf_counter()
    if not (directory / "complete").exists():
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        cfg = model_config(shape_kwargs(shape_name), dtype)
        write_tiny_tokenizer(directory)
        write_processor_configs(directory)
        (directory / "config.json").write_text(json.dumps(cfg, indent=2))
        state = {k: v.cpu() for k, v in random_state(cfg, dtype, device).items()}
        save_state_dict(state, directory, weights_format="safetensors")
        (directory / "complete").write_text("")
    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    return {"path": str(directory), "weight_bytes": weights, "write_s": time.perf_counter() - t0}


# -- 1. correctness ---------------------------------------------------------------------------
def agreement(a: list[int], b: list[int]) -> dict[str, Any]:
    """How far two token sequences agree: equal, fraction of equal positions, first divergence."""
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    same = sum(x == y for x, y in zip(a[:n], b[:n], strict=True))
    return {"equal": a == b, "n": n, "agreement": same / max(n, 1), "first_divergence": first}


def logit_diff(ref, other) -> dict[str, Any]:
    """bf16 logits against the fp32 ones on the same inputs: the max-diff, and how close the top-2
    of fp32 were where the argmax differs (ties that rounding may break)."""
    diff = (other - ref).abs()
    top2 = ref.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    same = ref.argmax(-1) == other.argmax(-1)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_logit_fp32": float(ref.abs().max()),
        "rel_max_diff": float(diff.max() / ref.abs().max()),
        "teacher_forced_argmax_agreement": float(same.float().mean()),
        "fp32_top1_top2_gap_median": float(gap.median()),
        "fp32_top1_top2_gap_where_argmax_differs": gap[~same].tolist()[:16],
    }


def answer_logits(model, processor, image, question: str, answer: list[int]):
    """Logits that predict each ``answer`` token, the prompt and the answer fed whole (no cache)."""
    import torch

    device = next(model.parameters()).device
    conversation = [
        {"role": "<|User|>", "content": f"{processor.image_tag}\n{question}", "images": [image]},
        {"role": "<|Assistant|>", "content": ""},
    ]
    with torch.inference_mode():
        inputs = processor(conversations=conversation, images=[image], force_batchify=True).to(device)
        embeds = model.prepare_inputs_embeds(**inputs)
        lm = model.language_model
        given = lm.get_input_embeddings()(torch.tensor([answer[:-1]], device=device)).to(embeds.dtype)
        hidden = lm.model(inputs_embeds=torch.cat([embeds, given], dim=1)).last_hidden_state
        return lm.lm_head(hidden[0, -len(answer) :]).float()


def image_logits(model, processor, prompt: str, codes: list[int], cfg_weight: float = 5.0):
    """CFG logits that predict each image code, the prompt and the codes fed whole (no cache)."""
    import torch

    from janus.testing.reference import t2i_prompt

    device = next(model.parameters()).device
    lm = model.language_model
    ids = torch.tensor(processor.tokenizer.encode(t2i_prompt(processor, prompt)), dtype=torch.long)
    rows = ids.repeat(2, 1)
    rows[1, 1:-1] = processor.pad_id  # DeepSeek's unconditional row
    with torch.inference_mode():
        embeds = lm.get_input_embeddings()(rows.to(device))
        given = model.prepare_gen_img_embeds(torch.tensor(codes[:-1], device=device))
        embeds = torch.cat([embeds, given[None].expand(2, -1, -1).to(embeds.dtype)], dim=1)
        hidden = lm.model(inputs_embeds=embeds).last_hidden_state[:, -len(codes) :]
        logits = model.gen_head(hidden).float()
        return logits[1] + cfg_weight * (logits[0] - logits[1])


def c4_understanding(models: dict[str, Any], processor, max_new_tokens: int = 32) -> dict[str, Any]:
    """Greedy answers of the bf16 and fp32 models (DeepSeek's path) and their logits along the fp32 one."""
    from benchmarks.bench_engines import QUESTIONS, caption_images
    from janus.testing.reference import reference_caption

    image, question = caption_images(1)[0], QUESTIONS[0]
    tokens = {
        d: reference_caption(m, processor, image, question, max_new_tokens)[1] for d, m in models.items()
    }
    ref = tokens["float32"]
    logits = {d: answer_logits(m, processor, image, question, ref) for d, m in models.items()}
    return {
        "greedy_tokens": agreement(ref, tokens["bfloat16"]),
        "logits": logit_diff(logits["float32"], logits["bfloat16"]),
    }


def c4_image_tokens(models: dict[str, Any], processor, n: int = 64) -> dict[str, Any]:
    """The same for the first ``n`` image tokens of DeepSeek's text-to-image loop (greedy, CFG 5)."""
    from benchmarks.bench_engines import PROMPTS
    from janus.testing.reference import reference_generate

    prompt = PROMPTS[0]
    codes = {
        d: reference_generate(m, processor, prompt, temperature=0.0, image_tokens=n)[0][0].tolist()
        for d, m in models.items()
    }
    ref = codes["float32"]
    logits = {d: image_logits(m, processor, prompt, ref) for d, m in models.items()}
    return {
        "greedy_tokens": agreement(ref, codes["bfloat16"]),
        "logits": logit_diff(logits["float32"], logits["bfloat16"]),
    }


def twin_synthesis(model, processor) -> dict[str, Any]:
    """tests/test_engine_synthesis.py on the device: a request alone == inside a mixed batch (sampled
    and greedy), and the greedy engine == DeepSeek's loop."""
    from benchmarks.bench_engines import PROMPTS
    from janus.engine import SynthesisEngine
    from janus.testing.reference import reference_generate

    engine = SynthesisEngine(model, processor, max_batch_size=8)
    sampled = {"prompt": PROMPTS[1], "seed": 42, "cfg_weight": 4.0, "temperature": 1.0}
    greedy = {"prompt": PROMPTS[0], "temperature": 0.0}
    batch = [
        {"prompt": PROMPTS[2], "seed": 1, "temperature": 0.8, "top_k": 50},
        sampled,
        {"prompt": PROMPTS[3]},
        greedy,
    ]

    def tokens(requests):
        results = engine.generate(requests)
        bad = [r.error for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"engine failed: {bad[0]}")
        return [r.tokens.tolist() for r in results]

    together = tokens(batch)
    alone_sampled, alone_greedy = tokens([sampled])[0], tokens([greedy])[0]
    reference = reference_generate(model, processor, greedy["prompt"], temperature=0.0)[0][0].tolist()
    return {
        "sampled_alone_vs_in_batch": agreement(alone_sampled, together[1]),
        "greedy_alone_vs_in_batch": agreement(alone_greedy, together[3]),
        "greedy_engine_vs_reference_loop": agreement(alone_greedy, reference),
    }


def twin_caption(model, processor, max_new_tokens: int = 32) -> dict[str, Any]:
    """tests/test_engine_captioning.py on the device: batched greedy text == DeepSeek's per-image path,
    and a request alone == inside the batch."""
    from benchmarks.bench_engines import QUESTIONS, caption_images
    from janus.engine import CaptionEngine
    from janus.testing.reference import reference_caption

    images = caption_images(4)
    requests = [
        {"image": im, "question": QUESTIONS[i], "max_new_tokens": max_new_tokens, "temperature": 0}
        for i, im in enumerate(images)
    ]
    engine = CaptionEngine(model, processor, max_batch_size=4)
    batch = [r.text for r in engine.generate(requests)]
    alone = engine.generate(requests[:1])[0].text
    reference = [
        reference_caption(model, processor, r["image"], r["question"], max_new_tokens)[0] for r in requests
    ]
    same = sum(a == b for a, b in zip(batch, reference, strict=True))
    return {
        "batch_equals_reference": f"{same}/{len(requests)}",
        "alone_equals_in_batch": alone == batch[0],
        "first_text": batch[0][:120],
    }


def section_correctness(rec: Recorder, plan: Plan, work: Path) -> None:
    import torch

    from benchmarks.bench_engines import model_shape

    device = torch.device(plan.device)
    shape = plan.shapes["correctness"]
    cfg = model_config(shape_kwargs(shape), "bfloat16")
    processor = processor_for(work)
    models: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        state = random_state(cfg, "bfloat16", device)  # bf16, as the official weights; fp32 runs them upcast
        for d in ("float32", "bfloat16"):
            models[d] = model_from_state(cfg, state, d, device)
        return {"shape": shape, "model_shape": model_shape(models["float32"])}

    def answers_decode_to_text() -> dict[str, Any]:
        """lm_head rows past the stand-in tokenizer's ~650 tokens are zeroed: every greedy answer token
        then decodes to text, so equal texts mean equal tokens (C4 above ran the untouched heads)."""
        n = len(processor.tokenizer)
        with torch.no_grad():
            for m in models.values():
                m.language_model.lm_head.weight[n:] = 0
        return {"zeroed_rows_from": n}

    rec.item("fp32 and bf16 models on the same bf16 weights", build)
    if len(models) < 2:
        return
    c4 = {
        "understanding": rec.item(
            "C4 understanding: bf16 vs fp32", lambda: c4_understanding(models, processor), 5
        ),
        "image_tokens_64": rec.item(
            "C4 64 image tokens: bf16 vs fp32", lambda: c4_image_tokens(models, processor), 5
        ),
    }
    rec.set("C4", c4)
    for d in plan.twin_dtypes:
        rec.item(f"equality twin, synthesis, {d}", lambda d=d: twin_synthesis(models[d], processor), 15)
    rec.item("lm_head rows past the tokenizer zeroed", answers_decode_to_text)
    for d in plan.twin_dtypes:
        rec.item(f"equality twin, captioning, {d}", lambda d=d: twin_caption(models[d], processor), 8)


# -- 2. synthesis throughput ------------------------------------------------------------------
#: Rough GPU seconds of a first compile + CUDA-graph capture of the decode step; later batch sizes
#: recompile (dynamo then marks the batch dynamic) in about half.
COMPILE_EST_S = {"1b": 70.0, "7b": 100.0}
HF_BUILD_EST_S = {"1b": 10.0, "7b": 25.0}


def call_estimate_s(shape: str, contender: str, batch: int) -> float:
    """Rough seconds of one full 576-token call on an H100/H200, so an item starts only if it can end.

    Per step: an eager step is launch-bound (~35 kernels a layer, ~6 ms for 24 layers), the CUDA
    graph replays in ~1.5 ms at batch 16, the KV cache read grows with the batch; VQ ~3 ms an image.
    """
    step_ms = {"engine": 6.0, "engine_compiled": 1.5, "ref_parallel": 8.0, "hf": 10.0}[contender]
    step_ms = step_ms * {"7b": 1.5}.get(shape, 1.0) + batch * {"1b": 0.04, "7b": 0.1}.get(shape, 0.0)
    return IMAGE_TOKENS * step_ms / 1000 + batch * 0.003


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


def timed_with_memory(fn: Callable[[], dict], device) -> Callable[[], dict]:
    """``fn`` with the allocator's resident memory before and its peak during the call in its info."""

    def run() -> dict:
        reset_peak(device)
        before = memory_gib(device)
        info = fn()
        after = memory_gib(device)
        if before is not None:
            info["memory"] = {
                "resident_before_gib": before["allocated_gib"],
                "peak_gib": after["peak_gib"],
                "working_gib": after["peak_gib"] - before["allocated_gib"],
            }
        return info

    return run


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
    from janus.testing.reference import reference_generate, t2i_prompt

    device = torch.device(plan.device)
    shape = plan.shapes[section]
    built = _model_item(rec, shape, plan, device, work)
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
    for batch, contender in plan.synthesis[section]:
        est = call_estimate_s(shape, contender, batch) * (1 + plan.repeats)
        if contender == "engine_compiled":
            est += COMPILE_EST_S.get(shape, 0.0) / (2 if compiled_before else 1)
            compiled_before = True
        if contender == "hf" and "hf" not in hf_cache:
            est += HF_BUILD_EST_S.get(shape, 0.0)
        rec.item(f"{contender} B={batch}", lambda b=batch, c=contender: measure(b, c), est)
        free_memory()


# -- 3. captioning throughput -----------------------------------------------------------------
def section_caption(rec: Recorder, plan: Plan, work: Path) -> None:
    rec.set(
        "measured",
        f"greedy, {plan.caption_tokens} new tokens (random weights never stop early), PIL images of 4 sizes "
        "preprocessed inside the call; engine: the whole batch in one call after a batch-1 warm-up; "
        f"ref_per_image: DeepSeek's per-image generate on {plan.caption_reference_images} images "
        "(its rate is per image)",
    )
    table: list[dict] = []
    for shape in caption_shapes(plan):
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

    device = torch.device(plan.device)
    built = _model_item(rec, shape, plan, device, work)
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
    images = caption_images(max(plan.caption_batches))
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(len(images))]
    contenders = caption_contenders(model, processor, images, questions, plan.caption_tokens)
    rows: list = []

    def measure(name: str, n: int) -> dict[str, Any]:
        idx = list(range(n))
        fn = contenders[name]
        first = plan.warmups and not any(r.contender == name for r in rows)
        warm = {name: lambda: fn(idx[:1])} if first else {}
        runs = run_interleaved({name: timed_with_memory(lambda: fn(idx), device)}, warm, plan.repeats, device)
        times, infos = runs[name]
        row = caption_row(name, times, infos, n, decode_bytes, plan.caption_tokens, common)
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
    for b in plan.caption_batches:
        rec.item(f"{shape} engine B={b}", lambda b=b: measure("engine", b), scale * (2 + b * 0.04))
    n_ref = plan.caption_reference_images
    rec.item(
        f"{shape} ref_per_image on {n_ref}", lambda: measure("ref_per_image", n_ref), scale * n_ref * 2.5
    )


# -- 4. the product's entry points: a Ray Data job and Ray Serve on the GPU -------------------
def product_env() -> dict[str, str]:
    """The environment of the product's own processes: this checkout first on the path (Ray's
    workers inherit it), so the code measured is this tree's whether or not a copy is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def start_process(cmd: list[str], log: Path) -> subprocess.Popen:
    """``cmd`` in its own session (so it can be stopped with all its children), output to ``log``."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=product_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process(proc: subprocess.Popen, grace_s: float = 20.0) -> int | None:
    """Ctrl-C first (Serve and Ray shut down cleanly), then SIGTERM, then SIGKILL, to the whole group."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
    with contextlib.suppress(ProcessLookupError):  # whatever of the group outlived its leader
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.poll()


def log_tail(log: Path, chars: int = 6000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


#: Ray's own message when its local node did not register within its fixed 30 s (ray/_private/node.py):
#: seen when another process held both cores of a 2-core machine (the test suite's other worker)
RAY_START_TIMEOUT = "The current node timed out during startup"
RAY_START_TRIES = 2


def ray_start_timed_out(*logs: Path) -> bool:
    return any(RAY_START_TIMEOUT in log_tail(log, 20000) for log in logs)


def last_json_object(text: str) -> dict[str, Any]:
    """The JSON summary the CLI prints last (an indented object starting on a line of its own)."""
    start = text.rfind("\n{\n")
    return json.loads(text[start + 1 if start >= 0 else 0 :])


def run_job_cli(plan: Plan, checkpoint: Path, prompts: Path, out: Path, log: Path, timeout_s: float) -> dict:
    """``python -m jobs.cli synthesize`` (what ``janus-pipeline synthesize`` runs), one model actor."""
    from benchmarks.bench_pipeline import commit_times, engine_seconds

    cuda = plan.device == "cuda"
    b = plan.job_batch
    sets = {
        "model.path": checkpoint,
        "model.dtype": plan.dtype,
        "input.url": prompts,
        "output.url": out,
        "synthesis.n_samples": 1,
        "compute.batch_size": b,
        "engine.max_batch_size": b,
        "output.rows_per_shard": b,
        "output.contact_sheet": 0,
        "quality.score": "false",  # like for like with the bare engine loop
        "compute.gpus_per_actor": 1 if cuda else 0,
        "ray.num_gpus": 1 if cuda else 0,
        **({} if cuda else {"ray.num_cpus": 2}),
    }
    cmd = [sys.executable, "-m", "jobs.cli", "synthesize"]
    cmd += [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]
    stdout = log.with_suffix(".stdout")
    deadline = time.time() + timeout_s
    for attempt in range(1, RAY_START_TRIES + 1):
        t0 = time.time()
        with open(stdout, "wb") as f, open(log, "ab") as err:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=product_env(), stdout=f, stderr=err, start_new_session=True
            )
            try:
                code = proc.wait(max(1.0, deadline - t0))
            except subprocess.TimeoutExpired:
                stop_process(proc, grace_s=5.0)
                raise TimeoutError(
                    f"the job ran past {timeout_s:.0f} s; its log ends:\n{log_tail(log)}"
                ) from None
        # the job failed before it read anything: its Ray did not start in time; once more, from scratch
        if code == 0 or attempt == RAY_START_TRIES or not ray_start_timed_out(log, stdout):
            break
        print(f"ray_data: the job's local Ray did not start in time; starting the job again ({log})", flush=True)
    wall = time.time() - t0
    if code != 0:
        raise RuntimeError(f"the job exited with {code}; its log ends:\n{log_tail(log)}{log_tail(stdout)}")
    summary = last_json_object(stdout.read_text())
    commits = commit_times(out)
    steady = None
    if len(commits) > 1:  # shards after the first, over the time between the first and the last commit
        steady = (summary["this_run"]["count"] - b) / (commits[-1] - commits[0])
    return {
        "command": " ".join(str(c) for c in cmd),
        "cli_wall_s": wall,
        "job_starts": attempt,
        "summary": summary,
        "actor_engine_s": engine_seconds(out),
        "first_commit_s": commits[0] - t0 if commits else None,
        "after_last_commit_s": t0 + wall - commits[-1] if commits else None,
        "steady_images_per_s": steady,
    }


def section_ray_data(rec: Recorder, plan: Plan, work: Path) -> None:
    import torch

    from benchmarks.bench_pipeline import bare_loop
    from pipeline.sources.prompt_files import read_prompts

    device = torch.device(plan.device)
    shape = plan.shapes["ray_data"]
    checkpoint = work / f"checkpoint-{shape}-{plan.dtype}"
    written = rec.item(
        f"{shape} checkpoint written (safetensors)",
        lambda: write_checkpoint(checkpoint, shape, plan.dtype, device),
        10,
    )
    free_memory()
    if written is None:
        return
    prompts = work / "job_prompts.txt"
    prompts.write_text("".join(f"prompt {i}: a small scene with {i} objects\n" for i in range(plan.job_rows)))
    rows = list(read_prompts(str(prompts)))  # the job's own keys and seeds
    requests = [{k: r[k] for k in ("prompt", "seed", "cfg_weight", "temperature")} for r in rows]
    rec.set(
        "measured",
        f"{len(rows)} prompts, batch {plan.job_batch}, {plan.dtype}, compile off in both (a compile would "
        "dominate a job this short); bare loop: the loader, a warm-up call, then SynthesisEngine.generate "
        "per batch in this process; job: `python -m jobs.cli synthesize` end to end (process start, local "
        "Ray, one GPU actor loading the same checkpoint, PNG + tar + Parquet sink)",
    )

    def bare() -> dict[str, Any]:
        t: dict[str, float] = {}
        seconds = bare_loop(
            checkpoint, requests, plan.job_batch, dtype=plan.dtype, device=plan.device, timings=t
        )
        free_memory()
        return {
            "bare_s": seconds,
            "images_per_s": len(rows) / seconds,
            "load_s": t["load_s"],
            "loader_gb_s": written["weight_bytes"] / t["load_s"] / 1e9,
            "warmup_s": t["warmup_s"],
        }

    est_batch = call_estimate_s(shape, "engine", plan.job_batch)
    n_batches = -(-len(rows) // plan.job_batch)
    base = rec.item("bare engine loop (loader included)", bare, 10 + est_batch * (n_batches + 1))
    job = rec.item(
        "Ray Data job: python -m jobs.cli synthesize",
        lambda: run_job_cli(plan, checkpoint, prompts, work / "job_out", work / "job.log", rec.timeout() - 2),
        18 + est_batch * n_batches,
    )
    if base and job:
        run_job_s = job["summary"]["this_run"]["seconds"]
        steady = job["steady_images_per_s"]
        rec.set(
            "efficiency",
            {
                "bare_images_per_s": base["images_per_s"],
                "job_images_per_s_end_to_end": len(rows) / job["cli_wall_s"],
                "efficiency_end_to_end": base["bare_s"] / job["cli_wall_s"],
                "efficiency_run_job": base["bare_s"] / run_job_s,
                "steady_images_per_s": steady,
                "efficiency_steady": None if steady is None else steady / base["images_per_s"],
                "engine_share_of_run_job": job["actor_engine_s"] / run_job_s,
                "note": "end to end includes the CLI's start, Ray's start and the actor's model load, which a "
                f"{len(rows)}-row job cannot amortise; steady = shards after the first over their commit times",
            },
        )


SERVE_MODEL = "janus-gpu-suite"


def serve_config(plan: Plan, checkpoint: Path, port: int) -> dict[str, Any]:
    """configs/serve_tiny.yaml on this checkpoint and port; on a GPU both models share it (0.5 each)
    and the synthesis engine is compiled, as configs/serve_prod.yaml has it."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "serve_tiny.yaml").read_text())
    cfg["http_options"].update(host="127.0.0.1", port=port)
    args = cfg["applications"][0]["args"]
    gpu = {"num_gpus": 0.5} if plan.device == "cuda" else {}
    for name in ("synthesis", "caption"):
        args[name]["model"] = {"path": str(checkpoint), "name": SERVE_MODEL, "dtype": plan.dtype}
        args[name]["deployment"]["ray_actor_options"] = {"num_cpus": 0.5, **gpu}
    args["synthesis"]["engine"]["compile"] = plan.serve_compile
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_serve(rec: Recorder, plan: Plan, work: Path) -> None:
    import httpx
    import PIL.Image
    import torch
    import yaml

    from benchmarks.load_serve import request_body

    device = torch.device(plan.device)
    shape = plan.shapes["serve"]
    checkpoint = work / f"checkpoint-{shape}-{plan.dtype}"
    if (
        rec.item(f"{shape} checkpoint", lambda: write_checkpoint(checkpoint, shape, plan.dtype, device), 5)
        is None
    ):
        return
    free_memory()
    port = free_port()
    config = work / "serve.yaml"
    config.write_text(yaml.safe_dump(serve_config(plan, checkpoint, port)))
    url = f"http://127.0.0.1:{port}"
    log = work / "serve.log"
    cmd = [sys.executable, "-m", "jobs.cli", "serve", "--config", str(config)]
    rec.set("command", " ".join(cmd))
    rec.set("config", yaml.safe_load(config.read_text()))
    proc = start_process(cmd, log)
    try:
        with httpx.Client(base_url=url, timeout=rec.timeout()) as client:

            def healthy() -> dict[str, Any]:
                nonlocal proc
                t0 = time.perf_counter()
                limit = rec.timeout() - 15  # time left for the requests after it
                starts = 1
                while time.perf_counter() - t0 < limit:
                    if proc.poll() is not None:
                        if starts < RAY_START_TRIES and ray_start_timed_out(log):
                            starts += 1  # its local Ray did not start in time: start the server again
                            log.rename(log.with_suffix(f".start{starts - 1}.log"))
                            proc = start_process(cmd, log)
                            continue
                        raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_tail(log)}")
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get("/health", timeout=5).status_code == 200:
                            return {"seconds_to_healthy": time.perf_counter() - t0, "server_starts": starts}
                    time.sleep(1.0)
                raise TimeoutError(f"/health never answered 200; the server's log ends:\n{log_tail(log)}")

            def call(method: str, path: str, body: dict | None = None, check=None) -> dict[str, Any]:
                t0 = time.perf_counter()
                r = client.request(method, path, json=body)
                out = {"status_code": r.status_code, "latency_s": time.perf_counter() - t0}
                if r.status_code != 200:
                    raise RuntimeError(f"{method} {path}: HTTP {r.status_code}: {r.text[:2000]}")
                return {**out, **(check(r.json()) if check else {"body": r.json()})}

            def image_check(body: dict) -> dict[str, Any]:
                png = base64.b64decode(body["data"][0]["b64_json"])
                return {
                    "image_size": list(PIL.Image.open(io.BytesIO(png)).size),
                    "seed": body["data"][0]["seed"],
                }

            def chat_check(body: dict) -> dict[str, Any]:
                choice = body["choices"][0]
                return {"finish_reason": choice["finish_reason"], "usage": body["usage"]}

            if rec.item("server up: GET /health answers 200", healthy, 20) is None:
                return
            rec.item("GET /health", lambda: call("GET", "/health"))
            rec.item("GET /v1/models", lambda: call("GET", "/v1/models"))
            chat = request_body("chat", SERVE_MODEL, 1, 16)[1]
            rec.item(
                "POST /v1/chat/completions", lambda: call("POST", "/v1/chat/completions", chat, chat_check), 5
            )
            images = request_body("images", SERVE_MODEL, 7, 16)[1]  # last: on a GPU its first call compiles
            rec.item(
                "POST /v1/images/generations",
                lambda: call("POST", "/v1/images/generations", images, image_check),
                5,
            )
    finally:
        code = stop_process(proc)
        rec.set("server_exit_code", code)
        rec.set("server_log_tail", log_tail(log, 4000))


# -- 0. environment ---------------------------------------------------------------------------
def versions() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }
    for name in (
        "torch",
        "transformers",
        "tokenizers",
        "timm",
        "ray",
        "fastapi",
        "pydantic",
        "numpy",
        "triton",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=p.total_memory / 2**30)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
    return out


def median_time_s(fn: Callable[[], Any], device, repeats: int = 10) -> float:
    """Median wall time of ``fn`` after one warm-up; CUDA events on the GPU."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device) -> dict[str, Any]:
    """Device-to-device copy of random data, bytes read plus written: the ceiling the decode step
    (bound by reading weights and KV cache) is held against."""
    import torch

    n = (2 << 30 if device.type == "cuda" else 64 << 20) // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    seconds = median_time_s(lambda: dst.copy_(src), device)
    return {"bytes": 2 * src.nbytes, "seconds": seconds, "gb_s": 2 * src.nbytes / seconds / 1e9}


def matmul_rate(device) -> dict[str, Any]:
    """A large bf16 (CPU: fp32) matrix product on random data: the arithmetic ceiling."""
    import torch

    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_time_s(lambda: a @ b, device)
    return {"n": n, "dtype": str(dtype), "seconds": seconds, "tflop_s": 2 * n**3 / seconds / 1e12}


def section_environment(rec: Recorder, plan: Plan, work: Path) -> None:
    import torch

    device = torch.device(plan.device)
    rec.item("versions", versions)
    rec.item("copy bandwidth", lambda: copy_bandwidth(device), 2)
    rec.item("bf16 matmul", lambda: matmul_rate(device), 2)
    free_memory()


# -- the suite --------------------------------------------------------------------------------
RUNNERS: dict[str, Callable[[Recorder, Plan, Path], None]] = {
    "environment": section_environment,
    "correctness": section_correctness,
    "synthesis_1b": lambda rec, plan, work: section_synthesis(rec, plan, work, "synthesis_1b"),
    "synthesis_7b": lambda rec, plan, work: section_synthesis(rec, plan, work, "synthesis_7b"),
    "caption": section_caption,
    "ray_data": section_ray_data,
    "serve": section_serve,
}


def run_section(name: str, plan: Plan, out: Path, work: Path, budget_s: float | None) -> None:
    """One section in this process; its JSON is final when this returns (or says why it is not)."""
    rec = Recorder(out / f"{name}.json", name, budget_s, plan)
    if plan.device == "cpu":  # a second OpenMP thread on a shared 2-core machine stalls 10x or more
        import torch

        torch.set_num_threads(1)
    try:
        RUNNERS[name](rec, plan, work)
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


def goals(out: Path, sections: list[str]) -> list[dict[str, Any]]:
    """The compass, read off the JSONs of the synthesis ``sections`` that ran."""
    checks: list[dict[str, Any]] = []

    def table(section: str) -> list[dict]:
        try:
            return json.loads((out / f"{section}.json").read_text()).get("table") or []
        except (OSError, ValueError):
            return []

    for section, key in (("synthesis_1b", "1b_images_per_s"), ("synthesis_7b", "7b_images_per_s")):
        if section not in sections:
            continue
        engines = [t for t in table(section) if t["contender"].startswith("engine")]
        best = max(engines, key=lambda t: t["images_per_s"], default=None)
        checks.append(
            {
                "goal": f"{section}: engine >= {GOALS[key]} images/s at the best batch",
                "measured": best and {k: best[k] for k in ("batch", "contender", "images_per_s")},
                "met": bool(best and best["images_per_s"] >= GOALS[key]),
            }
        )
        for ratio, goal in (
            ("x_reference", GOALS["x_reference"]),
            ("x_transformers", GOALS["x_transformers"]),
        ):
            batches = sorted({t["batch"] for t in engines if t[ratio] is not None})
            at = {
                b: max(t[ratio] for t in engines if t["batch"] == b and t[ratio] is not None) for b in batches
            }
            checks.append(
                {
                    "goal": f"{section}: engine >= {goal}x {ratio[2:]} at the same batch",
                    "measured": at or None,
                    "met": bool(at) and all(v >= goal for v in at.values()),
                }
            )
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="default: $OUT, else benchmarks/results/gpu_suite (out/gpu_suite_dry_run)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    ap.add_argument("--dry-run", action="store_true", help="the whole script on the CPU with the tiny model")
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
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    default = "out/gpu_suite_dry_run" if args.dry_run else "benchmarks/results/gpu_suite"
    out = Path(args.out or os.environ.get("OUT") or default).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.section:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a budget's end: record, then stop
        run_section(args.section, plan, out, Path(args.work), args.budget_s)
        return 0

    selected = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(selected) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
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
        "command": "python -m benchmarks.gpu_suite " + " ".join(argv if argv is not None else sys.argv[1:]),
        "isolated": isolate,
        "sections": {},
    }
    slack = 0.0
    try:
        for name in [s for s in SECTIONS if s in selected]:
            budget = max(BUDGET_S[name] * args.budget_scale + slack, 0.0) if plan.budgets else None
            t0 = time.perf_counter()
            print(
                f"=== {name} ({'no budget' if budget is None else f'budget {budget:.0f} s'}) ===", flush=True
            )
            if isolate:
                run_isolated(name, out, work, budget, args.dry_run)
            else:
                run_section(name, plan, out, work, budget)
            wall = time.perf_counter() - t0
            slack = 0.0 if budget is None else budget - wall
            data = json.loads((out / f"{name}.json").read_text())
            states = [i["status"] for i in data.get("items", [])]
            summary["sections"][name] = {
                "status": data.get("status"),
                "wall_s": round(wall, 1),
                "budget_s": None if budget is None else round(budget, 1),
                "file": f"{name}.json",
                **{f"items_{s}": states.count(s) for s in ("ok", "failed", "skipped")},
            }
            summary["wall_s"] = round(time.perf_counter() - t_start, 1)
            write_json(out / "summary.json", summary)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    summary["goals"] = goals(out, list(summary["sections"]))
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json(out / "summary.json", summary)
    print_summary(summary, out)
    return 0


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """A short table last: the device tool returns the end of the output."""
    print(f"\n=== gpu_suite summary ({summary['mode']}, {summary['wall_s']} s) -> {out} ===")
    for name, s in summary["sections"].items():
        print(
            f"{name:13s} {s['status']:10s} {s['wall_s']:7.1f} s of {s['budget_s'] or '-':>5}  "
            f"ok {s['items_ok']}  failed {s['items_failed']}  skipped {s['items_skipped']}"
        )
    for section in ("synthesis_1b", "synthesis_7b", "caption"):
        with contextlib.suppress(OSError, ValueError):
            for t in json.loads((out / f"{section}.json").read_text()).get("table") or []:
                ratios = "  ".join(
                    f"{k} {t[k]:.2f}" for k in ("x_reference", "x_transformers") if t.get(k) is not None
                )
                print(
                    f"  {section:12s} {t.get('shape', ''):4s} {t['contender']:15s} B={t['batch']:<4d}"
                    f"{t['images_per_s']:8.2f} img/s  {ratios}"
                )
    for g in summary.get("goals", []):
        print(f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}: {g['measured']}")


if __name__ == "__main__":
    raise SystemExit(main())
