"""A mini-GenEval on the shapes checkpoint: prompts from the grammar, judged by numpy, not by the model.

    python -m benchmarks.eval_shapes [--model shapes] [--n 128] [--held-out 64] [--cfg 1 1.5 3 5]

Synthesis: ``--n`` in-distribution prompts (fixed seed) generated at each cfg weight (temperature 1,
a fixed seed per prompt), every image judged (``janus.shapes.judge``): accuracy per attribute and
all-correct; the same at each cfg on held-out combinations (purple triangles, orange circles), which the
model never saw. Variation at ``--variation-cfg`` (5): ``--prompts`` prompts x ``--seeds`` seeds, how
many distinct images (64-bit pHash more than 4 bits from every one counted before) the judge reads
right per prompt, and the mean per-code entropy (bits) of the distribution those codes were sampled
from. Captioning: ``--n`` drawn scenes (with their variations) captioned greedily with the default
question after the image and before it (an OpenAI chat's text part first), each caption parsed back.
Writes benchmarks/results/eval_shapes.json and the seeds sheet (eval_shapes.png: a row per prompt, a
column per seed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from janus.engine import CaptionEngine, SynthesisEngine, load_model_and_processor
from janus.engine.prompts import DEFAULT_QUESTION, t2i_prompt_ids, unconditional_ids
from janus.shapes.data import Scene, caption, draw, parse_caption, random_scene
from janus.shapes.judge import correct, judge
from janus.utils.cli import OneLineParser
from pipeline.images import distinct, phash
from pipeline.model_ref import resolve_model_ref

RESULTS = Path(__file__).parent / "results"
ATTRIBUTES = ("color", "shape", "position", "background", "all")


def accuracy(marks: list[dict[str, bool]]) -> dict[str, float]:
    return {a: round(float(np.mean([m[a] for m in marks])), 4) for a in ATTRIBUTES}


def scenes(n: int, seed: int, held_out: bool = False) -> list[Scene]:
    rng = np.random.default_rng([seed, int(held_out)])
    return [random_scene(rng, held_out=held_out) for _ in range(n)]


def generate(engine: SynthesisEngine, wanted: list[Scene], cfg: float, seed: int) -> list[np.ndarray]:
    requests = [
        {"prompt": caption(s), "seed": seed * 100_000 + i, "cfg_weight": cfg, "temperature": 1.0}
        for i, s in enumerate(wanted)
    ]
    results = engine.generate(requests)
    return [r.image for r in results]


def judged(images: list[np.ndarray], wanted: list[Scene]) -> dict[str, float]:
    return accuracy([correct(judge(im), s.attributes()) for im, s in zip(images, wanted, strict=True)])


@torch.no_grad()
def code_entropy(model, processor, prompt: str, codes: np.ndarray, cfg: float) -> float:
    """Mean entropy (bits) of the distribution the engine samples each code from at ``cfg`` (temperature
    1: softmax of ``u + cfg * (c - u)``), given the codes before it, over images ``codes`` [k, n] of one
    prompt. Low: the model writes one image per prompt; high: it has more than one way to draw it."""
    from training.shapes.losses import generation_logits

    cond = t2i_prompt_ids(processor, prompt)
    k = len(codes)
    ids = torch.tensor([cond] * k + [unconditional_ids(cond, processor.pad_id)] * k)
    target = torch.as_tensor(np.asarray(codes), dtype=torch.long)
    logits = generation_logits(model, ids, torch.ones_like(ids), torch.cat([target, target]))
    guided = (logits[k:] + cfg * (logits[:k] - logits[k:])).log_softmax(-1)
    return float(-(guided.exp() * guided).sum(-1).mean() / np.log(2))


def variation(model, processor, engine: SynthesisEngine, args: argparse.Namespace) -> tuple[dict[str, Any], list]:
    """Seeds of one prompt: distinct images the judge reads right, per prompt, and the sampling entropy."""
    prompts = scenes(args.prompts, args.seed + 2)
    requests = [
        {"prompt": caption(s), "seed": j, "cfg_weight": args.variation_cfg, "temperature": 1.0}
        for s in prompts
        for j in range(args.seeds)
    ]
    results = engine.generate(requests)
    counts, entropies, right = [], [], []
    for p, scene in enumerate(prompts):
        mine = results[p * args.seeds : (p + 1) * args.seeds]
        ok = [correct(judge(r.image), scene.attributes())["all"] for r in mine]
        right.append(sum(ok))
        counts.append(distinct([phash(r.image) for r, good in zip(mine, ok, strict=True) if good]))
        codes = np.stack([r.tokens for r in mine])
        entropies.append(code_entropy(model, processor, caption(scene), codes, args.variation_cfg))
    report = {
        "cfg": args.variation_cfg,
        "prompts": args.prompts,
        "seeds": args.seeds,
        "distinct_right_per_prompt": counts,
        "right_per_prompt": right,
        "distinct_right_min": min(counts),
        "distinct_right_mean": round(float(np.mean(counts)), 2),
        "prompts_with_6_distinct_right": sum(c >= 6 for c in counts),
        "distinct_any_per_prompt": [
            distinct([phash(r.image) for r in results[p * args.seeds : (p + 1) * args.seeds]])
            for p in range(args.prompts)
        ],
        "code_entropy_bits": round(float(np.mean(entropies)), 4),
    }
    labels = [f"{s.color} {s.shape} {s.position}\n{s.background} bg, seed {j}" for s in prompts for j in range(args.seeds)]
    return report, list(zip([r.image for r in results], labels, strict=True))


def caption_accuracy(engine: CaptionEngine, n: int, seed: int) -> dict[str, Any]:
    """Captions of ``n`` drawn scenes, asked with the image before the question and after it."""
    rng = np.random.default_rng([seed, 7])
    drawn = [random_scene(rng) for _ in range(n)]
    images = [draw(s, rng=rng) for s in drawn]
    out: dict[str, Any] = {"n": n}
    for order, question in (("image_first", DEFAULT_QUESTION), ("text_first", f"{DEFAULT_QUESTION}\n{engine.image_tag}")):
        texts = [r.text for r in engine.generate([{"image": im, "question": question} for im in images])]
        marks = []
        for text, s in zip(texts, drawn, strict=True):
            read = parse_caption(text)
            marks.append(correct(read.attributes() if read else {}, s.attributes()))
        out[order] = accuracy(marks) | {"examples": [t.strip() for t in texts[:4]]}
    return out


def sheet(cells: list[tuple[np.ndarray, str]], path: Path, cols: int = 8) -> None:
    """Images with their labels (one or two lines) under them, to look at."""
    side, text_h = 128, 30
    rows = -(-len(cells) // cols)
    canvas = PIL.Image.new("RGB", (cols * side, rows * (side + text_h)), "white")
    pen = PIL.ImageDraw.Draw(canvas)
    for i, (im, label) in enumerate(cells):
        x, y = (i % cols) * side, (i // cols) * (side + text_h)
        canvas.paste(PIL.Image.fromarray(im).resize((side, side), PIL.Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(label.split("\n")[:2]):
            pen.text((x + 2, y + side + 2 + j * 13), line, fill="black")
    canvas.save(path)


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options both shapes evaluations take."""
    ap = OneLineParser(description=doc.split("\n")[0])
    ap.add_argument("--model", default="shapes", help="checkpoint (default: the packaged shapes model)")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / out))
    return ap


def shapes_model(args: argparse.Namespace):
    """(model, processor) of ``--model`` in fp32 on the CPU, with ``--threads`` torch threads."""
    torch.set_num_threads(args.threads)
    return load_model_and_processor(resolve_model_ref(args.model), dtype="float32", device="cpu")


def accuracy_by_cfg(engine: SynthesisEngine, args: argparse.Namespace) -> dict[str, Any]:
    """All-correct and each attribute per cfg weight, on in-distribution and on held-out prompts."""
    wanted, held = scenes(args.n, args.seed), scenes(args.held_out, args.seed, held_out=True)
    report: dict[str, Any] = {"synthesis": {}, "held_out": {"n": args.held_out}}
    for cfg in args.cfg:
        report["synthesis"][f"cfg{cfg:g}"] = judged(generate(engine, wanted, cfg, args.seed), wanted)
        report["held_out"][f"cfg{cfg:g}"] = judged(generate(engine, held, cfg, args.seed + 1), held)
        print(f"cfg {cfg:g}:", report["synthesis"][f"cfg{cfg:g}"], "held out:", report["held_out"][f"cfg{cfg:g}"], flush=True)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser(__doc__, "eval_shapes.json")
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5, 3.0, 5.0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts of the variation measure")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per prompt of the variation measure")
    ap.add_argument("--variation-cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model, processor = shapes_model(args)
    synth = SynthesisEngine(model, processor, max_batch_size=32)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"model": args.model, "n": args.n} | accuracy_by_cfg(synth, args)
    report["variation"], cells = variation(model, processor, synth, args)
    print("variation:", {k: v for k, v in report["variation"].items() if not isinstance(v, list)}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet(cells, Path(args.out).with_suffix(".png"), cols=args.seeds)
    report["captions"] = caption_accuracy(CaptionEngine(model, processor, max_batch_size=32), args.n, args.seed)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return write_report(report, args.out)


def write_report(report: dict[str, Any], out: str) -> dict[str, Any]:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
