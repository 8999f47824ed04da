"""Speculative decoding of image codes against plain decoding: passes, codes per pass, wall time, accuracy.

    python -m benchmarks.bench_speculative [--model shapes|small] [--batches 1 2 4 8 16] [--window 16]
                                           [--images 16] [--accuracy 128] [--threads 1] [--out FILE]

For each batch size and each method (``off``: one code per pass; ``jacobi``; ``coupled``), the same
requests (``--images`` prompts at cfg 5, temperature 1, fixed seeds) are generated in batches of that
size, the methods interleaved round by round (a shared machine's slow phases hit all of them), the
best of ``--repeats`` rounds kept: wall time per image (VQ decode included), forward passes per image
(the prefill's included) and codes per pass. Then the draft initialisations (``left``, ``random``) at
batch 1; ``max_rows``: the largest batch at which ``coupled`` beats plain; and ``coupled`` with that
policy at every batch size (never slower than plain is the goal).

On the shapes model, ``--accuracy`` prompts are also generated once per method and judged
(``janus.shapes.judge``): all-correct and each attribute with 95% Wilson intervals, so a change in
what the images show would be seen. Beside every acceptance figure: the model's mean per-code entropy
of the cfg-5 sampling distribution (bits), read along plain decoding's own codes, since acceptance
says little without it (a model that draws one fixed picture per prompt accepts every draft).
``--model small`` is the CPU benchmark's random-weights model (real-size VQ decoder, 16384 codes):
its drafts are accepted for reasons that say nothing about a trained model, so it is reported, never
tuned to. Writes the JSON and a plot (passes per image and wall time against batch size).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_engines import CONFIGS
from benchmarks.machine import command_line, cpu, git_state
from janus.engine import SynthesisEngine, load_model_and_processor
from janus.utils.cli import OneLineParser

RESULTS = Path(__file__).parent / "results"
METHODS = ("off", "jacobi", "coupled")
CFG = 5.0


def load(name: str, threads: int):
    torch.set_num_threads(threads)
    if name == "small":
        from janus.checkpoints import write_tiny_checkpoint

        path = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "small", seed=0, **CONFIGS["small"])
    else:
        from pipeline.model_ref import resolve_model_ref

        path = resolve_model_ref(name)
    return load_model_and_processor(str(path), dtype="float32", device="cpu")


def prompts(name: str, n: int, seed: int) -> list[dict[str, Any]]:
    if name == "small":
        texts = [f"a photo of object number {i} on a table" for i in range(n)]
    else:
        from janus.shapes.data import caption, random_scene

        rng = np.random.default_rng(seed)
        texts = [caption(random_scene(rng)) for _ in range(n)]
    return [{"prompt": t, "seed": seed * 10_000 + i, "cfg_weight": CFG, "temperature": 1.0} for i, t in enumerate(texts)]


def run(engine: SynthesisEngine, requests: list[dict], batch: int) -> tuple[float, list]:
    """Seconds per image and the results, ``requests`` generated ``batch`` at a time."""
    t0 = time.perf_counter()
    results = []
    for i in range(0, len(requests), batch):
        results += engine.generate(requests[i : i + batch])
    return (time.perf_counter() - t0) / len(requests), results


@torch.inference_mode()
def entropy_bits(engine: SynthesisEngine, requests: list[dict], codes: np.ndarray) -> float:
    """Mean entropy (bits) of the distribution each code was sampled from, along the given codes."""
    runner, total = engine.runner, []
    for i in range(0, len(requests), 8):
        batch = [engine.prepare(j, r) for j, r in enumerate(requests[i : i + 8])]
        forced = torch.tensor(codes[i : i + 8], device=engine.device)
        n, t = forced.shape
        embeds, mask = runner.prompt_embeds(batch)
        engine.decoder.setup_caches(2 * n, embeds.shape[1] + t, dtype=engine.dtype, device=engine.device)
        first, positions = engine.decoder.prefill(embeds, mask)
        window = runner.embed(torch.cat([forced, forced])[:, :-1])
        slots = torch.full((2 * n,), embeds.shape[1], device=engine.device)
        rest = engine.decoder.decode_window(window, positions, slots, embeds.shape[1] + t - 1)
        hidden = torch.cat([first[:, None], rest], dim=1)
        probs = runner.probabilities(hidden, runner.settings([p.request for p in batch])).double()
        total.append(-(probs * probs.clamp_min(1e-30).log2()).sum(-1).mean(-1))
        engine.decoder.release()
    return float(torch.cat(total).mean())


def wilson(k: int, n: int) -> list[float]:
    """95% Wilson interval of a proportion k / n."""
    z, p = 1.96, k / n
    mid, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [round((mid - half) / (1 + z * z / n), 4), round((mid + half) / (1 + z * z / n), 4)]


def judged(requests: list[dict], results: list) -> dict[str, Any]:
    from janus.shapes.data import parse_caption
    from janus.shapes.judge import correct, judge

    marks = [correct(judge(r.image), parse_caption(q["prompt"]).attributes()) for q, r in zip(requests, results, strict=True)]
    out = {}
    for attr in ("color", "shape", "position", "background", "all"):
        k = sum(m[attr] for m in marks)
        out[attr] = {"rate": round(k / len(marks), 4), "ci95": wilson(k, len(marks))}
    return out


def engines(model, processor, window: int, max_batch: int, **spec) -> dict[str, SynthesisEngine]:
    made = {}
    for method in METHODS:
        options = {"method": method, "window": window, **spec} if method != "off" else None
        made[method] = SynthesisEngine(model, processor, max_batch_size=max_batch, speculative=options)
    return made


def by_batch(made: dict[str, SynthesisEngine], requests: list[dict], batches: list[int], repeats: int) -> dict:
    table: dict[str, dict[str, Any]] = {}
    for batch in batches:
        best: dict[str, float] = {}
        passes: dict[str, float] = {}
        for _ in range(repeats):
            for method, engine in made.items():
                seconds, results = run(engine, requests, batch)
                best[method] = min(best.get(method, math.inf), seconds)
                passes[method] = float(np.mean([r.decode_passes for r in results]))
        codes = made["off"].image_tokens
        table[str(batch)] = {
            m: {
                "s_per_image": round(best[m], 4),
                "passes_per_image": round(passes[m], 2),
                "codes_per_pass": round(codes / passes[m], 2),
                "speedup": round(best["off"] / best[m], 3),
            }
            for m in made
        }
        print(f"batch {batch}:", json.dumps(table[str(batch)]), flush=True)
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes", help="shapes (trained) or small (random weights)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--accuracy", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: see benchmarks/README.md)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out or RESULTS / f"speculative_{args.model}_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)  # before the minutes of measuring, not after
    model, processor = load(args.model, args.threads)
    requests = prompts(args.model, max(args.images, max(args.batches)), args.seed)
    report: dict[str, Any] = {
        "command": command_line("benchmarks.bench_speculative", argv),
        "git": git_state(),
        "loadavg_start": os.getloadavg(),
        "model": args.model, "device": cpu(), "threads": args.threads, "cfg": CFG, "window": args.window,
        "images": len(requests),
    }  # fmt: skip
    made = engines(model, processor, args.window, max(args.batches))
    _, plain = run(made["off"], requests, 8)
    report["entropy_bits"] = round(entropy_bits(made["off"], requests, np.stack([r.tokens for r in plain])), 3)
    report["by_batch"] = by_batch(made, requests, args.batches, args.repeats)
    report["draft_init_batch1"] = {}
    for init in ("left", "random"):
        alt = engines(model, processor, args.window, 1, draft_init=init)
        report["draft_init_batch1"][init] = by_batch({m: alt[m] for m in METHODS}, requests[:8], [1], 1)["1"]
    wins = [b for b in args.batches if report["by_batch"][str(b)]["coupled"]["speedup"] > 1.0]
    report["max_rows"] = max(wins) if wins else None
    if report["max_rows"] is not None:
        policy = engines(model, processor, args.window, max(args.batches), max_rows=report["max_rows"])
        report["policy"] = by_batch({"off": made["off"], "coupled": policy["coupled"]}, requests, args.batches,
                                    args.repeats)
    if args.model != "small" and args.accuracy:
        checked = prompts(args.model, args.accuracy, args.seed + 1)
        report["accuracy"] = {m: judged(checked, run(e, checked, 8)[1]) for m, e in made.items()}
    report["loadavg_end"] = os.getloadavg()  # a shared machine: other processes skew the seconds
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps(report, indent=2))
    return report


COLOURS = {"off": (60, 60, 60), "jacobi": (30, 70, 220), "coupled": (220, 30, 30)}


def plot(report: dict[str, Any], path: Path) -> None:
    """Passes per image (left) and wall time per image (right) against batch size, one line per method
    (PIL only)."""
    import PIL.Image
    import PIL.ImageDraw

    batches = [int(b) for b in report["by_batch"]]
    w, h, m = 420, 320, 50
    img = PIL.Image.new("RGB", (2 * w, h + 30), "white")
    pen = PIL.ImageDraw.Draw(img)
    for panel, (key, label) in enumerate((("passes_per_image", "forward passes per image"),
                                          ("s_per_image", "wall time per image, s"))):
        x0 = panel * w
        values = [report["by_batch"][str(b)][meth][key] for b in batches for meth in METHODS]
        top = max(values) * 1.1
        pen.rectangle((x0 + m, 20, x0 + w - 15, h - m), outline="black")

        def xy(i: int, v: float, x0: int = x0, top: float = top) -> tuple[float, float]:
            return x0 + m + i / max(len(batches) - 1, 1) * (w - 15 - m), (h - m) - v / top * (h - m - 20)

        for meth in METHODS:
            pts = [xy(i, report["by_batch"][str(b)][meth][key]) for i, b in enumerate(batches)]
            pen.line(pts, fill=COLOURS[meth], width=2)
            for x, y in pts:
                pen.ellipse((x - 3, y - 3, x + 3, y + 3), fill=COLOURS[meth])
        for i, b in enumerate(batches):
            pen.text((xy(i, 0)[0] - 4, h - m + 4), str(b), fill="black")
        pen.text((x0 + m, h - m + 18), "batch (images)", fill="black")
        pen.text((x0 + m, 4), f"{label} (0 .. {top:.3g})", fill="black")
    for i, meth in enumerate(METHODS):
        pen.text((m + 10 + 110 * i, h + 12), meth, fill=COLOURS[meth])
    pen.text((m + 350, h + 12), f"{report['model']}, cfg {report['cfg']:g}, window {report['window']}, "
             f"{report['entropy_bits']} bits/code", fill="black")
    img.save(path)


if __name__ == "__main__":
    main()
