"""Throughput of our engines against DeepSeek's reference loops and transformers' own Janus.

    python -m benchmarks.bench_engines [--config small] [--device cpu] [--dtype float32] [--batch 8]
                                       [--tasks synthesis,caption] [--out benchmarks/results/x.json]

One random model (written in the official on-disk layout, then loaded by the normal loader) and one
batch are measured in one process, so every contender runs the same weights, batch and device:

synthesis (B different prompts, 576 image tokens each, CFG 5, T 1, VQ decode included)
  engine         SynthesisEngine.generate, all B prompts in one batch
  ref_per_prompt DeepSeek's loop once per prompt (parallel_size=1): what it can do for B prompts
  ref_parallel   DeepSeek's loop, parallel_size=B on ONE prompt: its best case
  hf             transformers' JanusForConditionalGeneration.generate(generation_mode="image"), B prompts
captioning (B images, a different question each, greedy, same max_new_tokens)
  engine         CaptionEngine.generate, all B images in one batch
  ref_per_image  DeepSeek's example path, language_model.generate(inputs_embeds=...) per image

Each contender is warmed up (one call at batch 1), then timed ``--repeats`` times with
time.perf_counter around whole calls, round-robin over the contenders (a shared machine's slow
phases hit all of them); the best (minimum) time is reported, all times are in the JSON.
"bandwidth" follows gpt-fast: bytes of the weights one decode step reads x sequential decode steps/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from benchmarks.machine import command_line, cpu, git_state
from janus.engine.common import sync
from janus.reference import reference_caption, reference_generate, t2i_prompt
from janus.utils.cli import OneLineParser

IMAGE_TOKENS = 576

#: write_tiny_checkpoint keyword sets. "small" is the CPU benchmark model: a 4-layer, 512-wide LLM
#: (vocab 1024) with the REAL-size VQ-16 decoder (ch 128, z 256, 5 levels, 384 px). 1b / 7b are the
#: Janus-Pro architectures with random weights (GPU only: the checkpoint is written to disk first).
_SHAPE_KEYS = (
    "hidden", "llm_layers", "llm_heads", "intermediate", "vocab_size",
    "vision_width", "vision_layers", "vision_heads", "vq_ch", "vq_z_channels",
)  # fmt: skip
_SHAPES = {
    #        hidden  layers heads  inter.   vocab  | vision width layers heads | vq ch  z
    "tiny": (64,     2,     4,     128,     1024,    64,          2,     4,      32,    32),
    "small": (512,   4,     8,     1408,    1024,    256,         4,     4,      128,   256),
    "1b": (2048,     24,    16,    5632,    102400,  1024,        24,    16,     128,   256),
    "7b": (4096,     30,    32,    11008,   102400,  1024,        24,    16,     128,   256),
}  # fmt: skip
CONFIGS: dict[str, dict[str, Any]] = {name: dict(zip(_SHAPE_KEYS, row, strict=True)) for name, row in _SHAPES.items()}
# as small but a quarter-width VQ decoder, so the LLM phase is not buried under it on CPU
CONFIGS["small-vq32"] = dict(CONFIGS["small"], vq_ch=32, vq_z_channels=64)

PROMPTS = [
    "A photo of a red apple on a wooden table, soft light, high detail",
    "A stunning princess from kabul in red, white traditional clothing, blue eyes, brown hair",
    "The quick brown fox jumps over the lazy dog",
    "Two people walking along the beach at sunset",
    "A cat sleeps on the warm windowsill",
    "The chart shows the revenue of the company over the last ten years",
    "Three birds sitting on the wire",
    "Waves rolling onto the sand, 4k, trending on artstation",
]
QUESTIONS = [
    "Describe this image in detail.",
    "What is shown in the picture?",
    "Convert the formula into latex code.",
    "How many birds are sitting on the wire?",
]


@dataclass
class Row:
    task: str
    contender: str
    device: str
    dtype: str
    config: str
    model_shape: str
    batch: int
    times_s: list[float]
    best_s: float
    images_per_s: float
    llm_s: float  # prefill + decode of the best run (VQ decode / vision excluded where separable)
    decode_tokens_per_s: float  # generated tokens (all rows) per second of llm_s
    steps_per_s: float  # sequential decode steps per second of llm_s
    bandwidth_gb_s: float  # decode bytes x steps_per_s
    best_cpu_s: float = 0.0  # least process CPU time of the repeats (all threads)
    images_per_cpu_s: float = 0.0  # batch / best_cpu_s: barely moved by other processes at --threads 1
    ratio_vs_reference: float | None = None
    ratio_vs_hf: float | None = None
    cpu_ratio_vs_reference: float | None = None
    cpu_ratio_vs_hf: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def rss_gib() -> float:
    """This process's resident memory (Linux), to spot leaks and memory pressure in long runs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def param_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def model_shape(model) -> str:
    lc = model.config.language_config
    vq = model.gen_vision_model.config
    tower = model.vision_model.vision_tower
    return (
        f"LLM {lc.num_hidden_layers}L x {lc.hidden_size} ({lc.num_attention_heads}h, mlp {lc.intermediate_size}, "
        f"vocab {lc.vocab_size}); SigLIP {len(tower.blocks)}L x {tower.embed_dim}; "
        f"VQ ch {vq.ch} z {vq.z_channels} mult {list(vq.ch_mult)}"
    )


def run_interleaved(
    fns: dict[str, Callable[[], dict]],
    warmups: dict[str, Callable[[], Any]],
    repeats: int,
    device: torch.device,
) -> dict[str, tuple[list[float], list[dict]]]:
    """Warm every contender up, then time round-robin: run r of every contender before run r + 1.

    Interleaving spreads slow phases of a shared machine over all contenders instead of one.
    Returns name -> (wall times, per-run info dicts that ``fn`` returned).
    """
    for name, warm in warmups.items():
        print(f"  warm-up {name}", flush=True)
        warm()
    out: dict[str, tuple[list[float], list[dict]]] = {name: ([], []) for name in fns}
    for rep in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            info = fn()
            sync(device)
            dt = time.perf_counter() - t0
            info["cpu_s"] = time.process_time() - c0  # all threads' CPU time: a check on contention
            out[name][0].append(dt)
            out[name][1].append(info)
            load, rss = os.getloadavg()[0], rss_gib()
            print(
                f"  run {rep + 1}/{repeats} {name}: {dt:.2f} s wall, {info['cpu_s']:.2f} s cpu "
                f"(load avg {load:.1f}, rss {rss:.1f} GiB)",
                flush=True,
            )
    return out


# -- synthesis contenders ---------------------------------------------------------------------
def synthesis_contenders(
    model, processor, prompts: list[str], args, hf=None
) -> dict[str, Callable[[list[str]], dict]]:
    """name -> fn(prompts) that produces all images and returns {"llm_s", "steps", "images"}.

    ``hf``: transformers' Janus on the same weights, when the caller already built it (a 7B copy
    takes long to build, and a GPU run measures several batch sizes on one model).
    """
    from janus.engine import SynthesisEngine

    engine = SynthesisEngine(
        model,
        processor,
        max_batch_size=len(prompts),
        vq_decode_batch_size=args.vq_batch,
        compile=args.compile,
    )

    def run_engine(ps):
        res = engine.generate([{"prompt": p, "seed": i} for i, p in enumerate(ps)])
        figures = engine_figures(res, "engine")
        vq_s = res[0].timings["vq_decode_s"]
        return {**figures, "vq_s": vq_s, "steps": IMAGE_TOKENS, "images": [r.image for r in res]}

    def run_ref_per_prompt(ps):
        gen = torch.Generator(device=args.device).manual_seed(0)
        llm = vq = 0.0
        images = []
        for p in ps:
            t: dict[str, float] = {}
            _, img = reference_generate(model, processor, p, parallel_size=1, generator=gen, timings=t)
            llm, vq = llm + t["llm_s"], vq + t["vq_decode_s"]
            images.extend(img)
        return {"llm_s": llm, "vq_s": vq, "steps": IMAGE_TOKENS * len(ps), "images": images}

    def run_ref_parallel(ps):
        gen = torch.Generator(device=args.device).manual_seed(0)
        t: dict[str, float] = {}
        _, img = reference_generate(model, processor, ps[0], parallel_size=len(ps), generator=gen, timings=t)
        return {"llm_s": t["llm_s"], "vq_s": t["vq_decode_s"], "steps": IMAGE_TOKENS, "images": list(img)}

    out = {"engine": run_engine, "ref_per_prompt": run_ref_per_prompt, "ref_parallel": run_ref_parallel}
    if "hf" in args.contenders:
        from benchmarks.hf_baseline import hf_generate_images, hf_janus_from_model

        hf = hf if hf is not None else hf_janus_from_model(model, processor)

        def run_hf(ps):
            rows = [processor.tokenizer.encode(t2i_prompt(processor, p)) for p in ps]
            ids, mask = left_pad(rows, processor.pad_id)
            t: dict[str, float] = {}
            _, images = hf_generate_images(hf, ids.to(args.device), mask.to(args.device), timings=t)
            return {
                "llm_s": t["llm_s"],
                "vq_s": t["vq_decode_s"],
                "steps": IMAGE_TOKENS,
                "images": list(images),
            }

        out["hf"] = run_hf
    return {k: v for k, v in out.items() if k in args.contenders}


def engine_figures(results: list, what: str) -> dict[str, float]:
    """The model time of one engine call (its results share the batch's timings); raises if a row failed."""
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{what} failed: {bad[0]}")
    t = results[0].timings
    return {"llm_s": t["prefill_s"] + t["decode_s"], "prefill_s": t["prefill_s"], "decode_s": t["decode_s"]}


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r)
        mask[i, length - len(r) :] = 1
    return ids, mask


def bench_synthesis(model, processor, args, common: dict) -> list[Row]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    lm = model.language_model
    decode_bytes = param_bytes(lm.model.layers, lm.model.norm, model.gen_head, model.gen_aligner)
    contenders = synthesis_contenders(model, processor, prompts, args)
    print(f"[synthesis] B={len(prompts)}: {', '.join(contenders)}", flush=True)
    runs = timed_runs(contenders, prompts, "synthesis", args, common)
    if runs is None:
        return []
    rows = [
        synthesis_row(name, times, infos, len(prompts), decode_bytes, common)
        for name, (times, infos) in runs.items()
    ]
    add_ratios(rows, "ref_per_prompt")
    return rows


def timed_runs(contenders: dict[str, Callable], items: list, task: str, args, common: dict) -> dict | None:
    """Each contender on all ``items`` and, interleaved, on the first alone; None with ``--profile``
    (each contender is profiled instead)."""
    if args.profile:
        profile_contenders(contenders, items, items[:1], task, args)
        return None
    return run_interleaved(
        {k: (lambda fn=fn: fn(items)) for k, fn in contenders.items()},
        {k: (lambda fn=fn: fn(items[:1])) for k, fn in contenders.items()},
        args.repeats,
        common["_device"],
    )


def contender_row(
    task: str, name: str, times: list[float], batch: int, tokens: int, steps: int, llm_s: float,
    decode_bytes: int, common: dict, extra: dict[str, Any],
) -> Row:  # fmt: skip
    """A contender's Row: its best time, and the rates of ``tokens`` and ``steps`` over ``llm_s``."""
    steps_s = steps / llm_s
    return Row(
        task=task,
        contender=name,
        batch=batch,
        times_s=times,
        best_s=min(times),
        images_per_s=batch / min(times),
        llm_s=llm_s,
        decode_tokens_per_s=tokens / llm_s,
        steps_per_s=steps_s,
        bandwidth_gb_s=decode_bytes * steps_s / 1e9,
        extra=extra,
        **{k: v for k, v in common.items() if not k.startswith("_")},
    )


def synthesis_row(
    name: str, times: list[float], infos: list[dict], batch: int, decode_bytes: int, common: dict
) -> Row:
    """One synthesis contender's Row from its timed runs (the figures are those of the best run)."""
    best = int(np.argmin(times))
    info = infos[best]
    assert len(info["images"]) == batch
    assert all(im.dtype == np.uint8 and im.shape[-1] == 3 for im in info["images"])
    extra = {
        "vq_decode_s": info["vq_s"],
        "decode_bytes": decode_bytes,
        "llm_s_all": [i["llm_s"] for i in infos],
        "cpu_s_all": [i["cpu_s"] for i in infos],
        "vq_decode_s_all": [i["vq_s"] for i in infos],
        "image_shape": list(info["images"][0].shape),
        **{k: info[k] for k in ("prefill_s", "decode_s") if k in info},
    }
    tokens = batch * IMAGE_TOKENS
    return contender_row("synthesis", name, times, batch, tokens, info["steps"], info["llm_s"], decode_bytes, common, extra)


# -- captioning contenders --------------------------------------------------------------------
def caption_images(n: int) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(384, 384), (640, 480), (300, 500), (512, 256)]
    return [
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in (sizes[i % len(sizes)] for i in range(n))
    ]


def caption_contenders(
    model, processor, images: list[PIL.Image.Image], questions: list[str], max_new_tokens: int
) -> dict[str, Callable[[list[int]], dict]]:
    """name -> fn(indices of ``images``) that captions those images, greedy, and returns
    {"llm_s", "steps", "tokens", "texts"}; llm_s is None where generate() is not separable."""
    from janus.engine import CaptionEngine

    engine = CaptionEngine(model, processor, max_batch_size=len(images))

    def run_engine(idx):
        res = engine.generate(
            [
                {
                    "image": images[i],
                    "question": questions[i],
                    "max_new_tokens": max_new_tokens,
                    "temperature": 0,
                }
                for i in idx
            ]
        )
        figures = engine_figures(res, "caption engine")
        steps = int(res[0].timings["decode_steps"])
        return {**figures, "steps": steps, "tokens": sum(r.num_tokens for r in res), "texts": [r.text for r in res]}

    def run_ref(idx):
        texts, tokens = [], 0
        for i in idx:
            text, ids = reference_caption(model, processor, images[i], questions[i], max_new_tokens)
            texts.append(text)
            tokens += len(ids)
        return {"llm_s": None, "steps": tokens, "tokens": tokens, "texts": texts}

    return {"engine": run_engine, "ref_per_image": run_ref}


def bench_caption(model, processor, args, common: dict) -> list[Row]:
    images = caption_images(args.batch)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.batch)]
    lm = model.language_model
    decode_bytes = param_bytes(lm.model.layers, lm.model.norm, lm.lm_head)
    contenders = caption_contenders(model, processor, images, questions, args.max_new_tokens)
    idx = list(range(args.batch))
    print(f"[caption] B={args.batch}: {', '.join(contenders)}", flush=True)
    runs = timed_runs(contenders, idx, "caption", args, common)
    if runs is None:
        return []
    rows = [
        caption_row(name, times, infos, args.batch, decode_bytes, args.max_new_tokens, common)
        for name, (times, infos) in runs.items()
    ]
    texts = {name: infos[int(np.argmin(times))]["texts"] for name, (times, infos) in runs.items()}
    same = sum(a == b for a, b in zip(texts["engine"], texts["ref_per_image"], strict=True))
    for r in rows:
        r.extra["greedy_texts_equal_reference"] = f"{same}/{args.batch}"
    add_ratios(rows, "ref_per_image")
    return rows


def caption_row(
    name: str,
    times: list[float],
    infos: list[dict],
    batch: int,
    decode_bytes: int,
    max_new_tokens: int,
    common: dict,
) -> Row:
    """One captioning contender's Row from its timed runs (the figures are those of the best run)."""
    best = int(np.argmin(times))
    info = infos[best]
    llm_s = info["llm_s"] if info["llm_s"] is not None else times[best]  # generate() is all LLM + vision
    extra = {
        "cpu_s_all": [i["cpu_s"] for i in infos],
        "max_new_tokens": max_new_tokens,
        "generated_tokens": info["tokens"],
        "decode_bytes": decode_bytes,
        **{k: info[k] for k in ("prefill_s", "decode_s") if k in info},
    }
    return contender_row("caption", name, times, batch, info["tokens"], info["steps"], llm_s, decode_bytes, common, extra)


# -- reporting --------------------------------------------------------------------------------
def add_ratios(rows: list[Row], reference: str) -> None:
    by = {r.contender: r for r in rows}
    for r in rows:
        cpu = r.extra.get("cpu_s_all") or []
        if cpu:
            r.best_cpu_s = min(cpu)
            r.images_per_cpu_s = r.batch / r.best_cpu_s
    for r in rows:
        cpu = r.extra.get("cpu_s_all") or []
        if reference in by:
            r.ratio_vs_reference = r.images_per_s / by[reference].images_per_s
            if cpu and by[reference].images_per_cpu_s:
                r.cpu_ratio_vs_reference = r.images_per_cpu_s / by[reference].images_per_cpu_s
        if "hf" in by:
            r.ratio_vs_hf = r.images_per_s / by["hf"].images_per_s
            if cpu and by["hf"].images_per_cpu_s:
                r.cpu_ratio_vs_hf = r.images_per_cpu_s / by["hf"].images_per_cpu_s


def format_row(r: Row) -> str:
    ratio = "" if r.ratio_vs_reference is None else f"  x{r.ratio_vs_reference:.2f} vs ref"
    return (
        f"{r.task:9s} {r.contender:15s} {r.device} {r.dtype:8s} B={r.batch:<3d} best {r.best_s:8.2f} s  "
        f"{r.images_per_s:7.3f} img/s  llm {r.llm_s:7.2f} s  {r.decode_tokens_per_s:9.1f} tok/s  "
        f"{r.steps_per_s:7.1f} steps/s  {r.bandwidth_gb_s:6.2f} GB/s{ratio}"
        f"  | cpu {r.best_cpu_s:7.2f} s {r.images_per_cpu_s:7.3f} img/cpu-s"
    )


def profile_contenders(contenders: dict[str, Callable], full: Any, small: Any, task: str, args) -> None:
    """--profile mode: no timed runs; the engine is warmed up, then one full call runs under
    torch.profiler and its op table is written next to the JSON (``<out>.profile_<task>_engine.txt``).

    A separate mode because a 576-step profile holds GBs of events and would skew the timings. Only
    the engine is profiled: profiling the reference loop (transformers' LlamaModel with a dynamic
    cache, 576 steps) grows past 23 GB of RAM under torch 2.14 on CPU.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, fn in contenders.items():
        if name != "engine":
            continue
        fn(small)
        gc.collect()
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            info = fn(full)
        wall = time.perf_counter() - t0
        phases = {k: round(v, 3) for k, v in info.items() if k.endswith("_s") and isinstance(v, float)}
        table = prof.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30
        )
        path = Path(args.out).with_suffix("").as_posix() + f".profile_{task}_{name}.txt"
        header = (
            f"{task} / {name}: one call, batch {args.batch}, {args.config}, {args.device}, {args.dtype}\n"
            f"wall {wall:.2f} s under the profiler; phases {phases}\n\n"
        )
        Path(path).write_text(header + table + "\n")
        del prof
        gc.collect()
        print(f"profile of {task}/{name} ({wall:.1f} s) written to {path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tasks", default="synthesis,caption")
    ap.add_argument("--contenders", default="engine,ref_per_prompt,ref_parallel,hf,ref_per_image")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="captioning tokens per image")
    ap.add_argument("--vq-batch", type=int, default=8, help="engine's vq_decode_batch_size")
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine's decode step")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing, profile one engine call (op table next to --out)",
    )
    ap.add_argument("--checkpoint", default=None, help="use this checkpoint dir instead of a random one")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.contenders = set(args.contenders.split(",")) | {"engine"}
    tasks = args.tasks.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = (
            f"benchmarks/results/{args.config}_{args.device.replace(':', '')}_{args.dtype}_b{args.batch}.json"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    from janus.checkpoints import write_tiny_checkpoint
    from janus.models import MultiModalityCausalLM, VLChatProcessor

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or write_tiny_checkpoint(
            Path(tmp) / "ckpt", seed=0, dtype=args.dtype, **CONFIGS[args.config]
        )
        model = MultiModalityCausalLM.from_pretrained(path, dtype=args.dtype, device=args.device)
        processor = VLChatProcessor.from_pretrained(path)
    device = next(model.parameters()).device
    print(f"model ready in {time.perf_counter() - t0:.1f} s: {model_shape(model)}", flush=True)
    common = {
        "device": str(device),
        "dtype": args.dtype,
        "config": args.config,
        "model_shape": model_shape(model),
        "_device": device,
    }
    rows: list[Row] = []
    if "synthesis" in tasks:
        rows += bench_synthesis(model, processor, args, common)
    if "caption" in tasks:
        rows += bench_caption(model, processor, args, common)
    if args.profile:
        return

    print(f"\nsummary (best of {args.repeats} interleaved runs after warm-up)")
    for r in rows:
        hf = "" if r.ratio_vs_hf is None else f"  x{r.ratio_vs_hf:.2f} vs hf"
        cpu_time = (
            "" if r.cpu_ratio_vs_reference is None else f"  (cpu-time x{r.cpu_ratio_vs_reference:.2f} vs ref"
        )
        cpu_time += "" if r.cpu_ratio_vs_hf is None else f", x{r.cpu_ratio_vs_hf:.2f} vs hf"
        print(format_row(r) + hf + (cpu_time + ")" if cpu_time else ""))
    meta = {
        "command": command_line("benchmarks.bench_engines", argv),
        "git": git_state(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": cpu(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "repeats": args.repeats,
        "statistic": "best (min) wall time of the repeats, and separately the least process CPU time; "
        "repeats interleaved round-robin over contenders after one batch-1 warm-up call each",
        "image_tokens": IMAGE_TOKENS,
        "wall_s": time.perf_counter() - t0,
        # other processes on a shared machine skew the numbers: (1, 5, 15 min) load averages
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"wrote {args.out} ({meta['wall_s']:.0f} s total)")


if __name__ == "__main__":
    main()
