"""A mini-GenEval on the shapes checkpoint: prompts from the grammar, judged by numpy, not by the model.

    python -m benchmarks.eval_shapes [--model shapes] [--n 128] [--held-out 64] [--cfg 1 2 3 5]

Synthesis: ``--n`` in-distribution prompts (fixed seed) generated at each cfg weight (temperature 1,
a fixed seed per prompt), every image judged (``janus.shapes.judge``): accuracy per attribute and
all-correct; the same at each cfg on held-out combinations (purple triangles, orange circles), which the
model never saw. Captioning: ``--n`` drawn scenes captioned (greedy, the default question), each
caption parsed back into attributes. Writes benchmarks/results/eval_shapes.json and a sheet of the
first generated images with their prompts (eval_shapes.png).
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
from janus.shapes.data import Scene, caption, draw, parse_caption, random_scene
from janus.shapes.judge import correct, judge
from janus.utils.cli import OneLineParser
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


def caption_accuracy(engine: CaptionEngine, n: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng([seed, 7])
    drawn = [random_scene(rng) for _ in range(n)]
    texts = [r.text for r in engine.generate([{"image": draw(s, rng=rng)} for s in drawn])]
    marks = []
    for text, s in zip(texts, drawn, strict=True):
        read = parse_caption(text)
        marks.append(correct(read.attributes() if read else {}, s.attributes()))
    return accuracy(marks) | {"examples": [t.strip() for t in texts[:4]]}


def sheet(images: list[np.ndarray], prompts: list[str], path: Path, cols: int = 8) -> None:
    """Images with their prompts under them, to look at."""
    side, text_h = 128, 30
    rows = -(-len(images) // cols)
    canvas = PIL.Image.new("RGB", (cols * side, rows * (side + text_h)), "white")
    pen = PIL.ImageDraw.Draw(canvas)
    for i, (im, prompt) in enumerate(zip(images, prompts, strict=True)):
        x, y = (i % cols) * side, (i // cols) * (side + text_h)
        canvas.paste(PIL.Image.fromarray(im).resize((side, side), PIL.Image.Resampling.NEAREST), (x, y))
        words = prompt.removeprefix("a ").split(", ")
        for j, line in enumerate(words[:2]):
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser(__doc__, "eval_shapes.json")
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model, processor = shapes_model(args)
    synth = SynthesisEngine(model, processor, max_batch_size=32)
    t0 = time.perf_counter()
    wanted = scenes(args.n, args.seed)
    report: dict[str, Any] = {"model": args.model, "n": args.n, "synthesis": {}}
    held = scenes(args.held_out, args.seed, held_out=True)
    report["held_out"] = {"n": args.held_out}
    sheets = {}
    for cfg in args.cfg:
        images = generate(synth, wanted, cfg, args.seed)
        report["synthesis"][f"cfg{cfg:g}"] = judged(images, wanted)
        sheets[cfg] = images[:32]
        report["held_out"][f"cfg{cfg:g}"] = judged(generate(synth, held, cfg, args.seed + 1), held)
        print(
            f"cfg {cfg:g}:",
            report["synthesis"][f"cfg{cfg:g}"],
            "held out:",
            report["held_out"][f"cfg{cfg:g}"],
            flush=True,
        )
    best = max(
        args.cfg,
        key=lambda c: (report["synthesis"][f"cfg{c:g}"]["all"], report["synthesis"][f"cfg{c:g}"]["color"]),
    )
    report["best_cfg"] = best
    sheet(sheets[best], [caption(s) for s in wanted[:32]], Path(args.out).with_suffix(".png"))
    report["captions"] = {"n": args.n} | caption_accuracy(
        CaptionEngine(model, processor, max_batch_size=32), args.n, args.seed
    )
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return write_report(report, args.out)


def write_report(report: dict[str, Any], out: str) -> dict[str, Any]:
    Path(out).parent.mkdir(exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
