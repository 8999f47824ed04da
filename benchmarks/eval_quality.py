"""Does the self-verification score help choose which images to keep? Measured on the shapes model,
judged by numpy (``janus.shapes.judge``), plus what the score costs on the CPU benchmark model.

    python -m benchmarks.eval_quality [--n 128] [--cfg 1.5] [--skip-cost]

1. ranking: how well the score (with each image's own prompt) tells the generated images the judge
   reads right from those it reads wrong (AUROC, ``--n`` in-distribution prompts at ``--cfg``, default
   1.5, where the model makes enough mistakes to rank); and AUROC of score(image, its own prompt)
   against score(image, the prompt with one attribute changed), per attribute, over the same images
   and over the same scenes drawn (the reading alone, apart from the drawing);
2. best-of: the judge's all-correct rate with best_of 4 against best_of 1 (candidate 0 is the row's own
   seed, so best_of 1 is exactly the plain image);
3. filtering: kept fraction and all-correct rate of what is kept, for several min_score thresholds
   (a table, and the plot as eval_quality.png);
4. cost: the score's time per image as a fraction of the synthesis time (``small`` config with the
   real-size VQ, bf16, batch 8, CPU).
Writes benchmarks/results/eval_quality.json.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from benchmarks.eval_shapes import parser, shapes_model, write_report
from janus.engine import CaptionEngine, SynthesisEngine, load_model_and_processor
from janus.engine.quality import CuratedSynthesis, QualityOptions, Reader
from janus.shapes.data import ATTRIBUTES, Scene, caption, draw, one_changed, random_scene
from janus.shapes.judge import auroc, correct, judge

RESULTS = Path(__file__).parent / "results"
THRESHOLDS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 0.95)


def ranking(reader: Reader, images: list[np.ndarray], wanted: list[Scene], seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    features = reader.features(images)
    own = reader.scores(features, [caption(s) for s in wanted])
    judged_ok = [correct(judge(im), s.attributes())["all"] for im, s in zip(images, wanted, strict=True)]
    out: dict[str, Any] = {}
    negatives_all = []
    for attribute in ATTRIBUTES:
        other = reader.scores(features, [caption(one_changed(s, rng, attribute=attribute)) for s in wanted])
        negatives_all.extend(other.tolist())
        out[attribute] = round(auroc(own.tolist(), other.tolist()), 4)
        ok = [i for i, good in enumerate(judged_ok) if good]
        out[f"{attribute}_on_correct_images"] = round(auroc(own[ok].tolist(), other[ok].tolist()), 4) if ok else None
    out["all_attributes"] = round(auroc(own.tolist(), negatives_all), 4)
    out["mean_score_own_prompt"] = round(float(own.mean()), 4)
    out["mean_score_changed_prompt"] = round(float(np.mean(negatives_all)), 4)
    return out


def score_vs_judge(scores: np.ndarray, ok: list[bool]) -> dict[str, Any]:
    """AUROC of the score between the images the judge reads right and those it reads wrong: does the
    model flag its own mistakes?"""
    right, wrong = scores[np.asarray(ok)], scores[~np.asarray(ok)]
    value = auroc(right.tolist(), wrong.tolist()) if len(right) and len(wrong) else None
    return {
        "auroc": round(value, 4) if value is not None else None,
        "right": len(right),
        "wrong": len(wrong),
        "mean_score_right": round(float(right.mean()), 4) if len(right) else None,
        "mean_score_wrong": round(float(wrong.mean()), 4) if len(wrong) else None,
    }


def plot(points: list[dict[str, float]], path: Path) -> None:
    """Kept fraction (x) against all-correct of what is kept (y), one point per threshold that keeps any."""
    points = [p for p in points if p["kept"] > 0]
    w, h, m = 520, 360, 50
    img = PIL.Image.new("RGB", (w, h), "white")
    pen = PIL.ImageDraw.Draw(img)
    pen.rectangle((m, 20, w - 20, h - m), outline="black")
    lo = min(p["all_correct"] for p in points)
    lo = max(0.0, min(lo, 0.9) - 0.05)

    def xy(p: dict[str, float]) -> tuple[float, float]:
        return m + p["kept"] * (w - 20 - m), (h - m) - (p["all_correct"] - lo) / (1 - lo) * (h - m - 20)

    coords = [xy(p) for p in sorted(points, key=lambda p: p["kept"])]
    pen.line(coords, fill=(30, 70, 220), width=2)
    for p in points:
        x, y = xy(p)
        pen.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(220, 30, 30))
        pen.text((x + 6, y - 12), f"{p['threshold']:g}", fill="black")
    pen.text((m, h - m + 8), "kept fraction (0 .. 1)", fill="black")
    pen.text((m, 4), f"all-correct of kept images ({lo:.2f} .. 1); labels: min_score", fill="black")
    img.save(path)


def filtering(scores: np.ndarray, ok: list[bool]) -> list[dict[str, float]]:
    rows = []
    for t in THRESHOLDS:
        kept = scores >= t
        rows.append(
            {
                "threshold": t,
                "kept": round(float(kept.mean()), 4),
                "all_correct": round(float(np.mean(np.asarray(ok)[kept])), 4) if kept.any() else None,
            }
        )
    return rows


def score_cost(threads: int) -> dict[str, Any]:
    """Synthesis vs scoring time for 8 images, bf16, the CPU benchmark model (real-size VQ decoder)."""
    from benchmarks.bench_engines import CONFIGS
    from janus.checkpoints import write_tiny_checkpoint

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(Path(tmp) / "small", **CONFIGS["small"])
        model, processor = load_model_and_processor(str(path), dtype="bfloat16", device="cpu")
    synth = SynthesisEngine(model, processor, max_batch_size=8)
    reader = Reader(CaptionEngine(model, processor, max_batch_size=8))
    prompts = [f"a photo of object number {i} on a table" for i in range(8)]
    synth.generate(prompts[:1])  # warm-up
    t0 = time.perf_counter()
    results = synth.generate([{"prompt": p, "seed": i} for i, p in enumerate(prompts)])
    synthesis_s = time.perf_counter() - t0
    reader.scores(reader.features([results[0].image]), prompts[:1])  # warm-up
    t1 = time.perf_counter()
    reader.scores(reader.features([r.image for r in results]), prompts)
    score_s = time.perf_counter() - t1
    return {
        "config": "small (4L x 512 LLM, SigLIP 4L x 256, real-size VQ-16), bf16, CPU",
        "threads": threads,
        "batch": 8,
        "synthesis_s": round(synthesis_s, 2),
        "score_s": round(score_s, 3),
        "score_fraction": round(score_s / synthesis_s, 4),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser(__doc__, "eval_quality.json")
    ap.add_argument("--best-of", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--cfg", type=float, default=1.5, help="cfg weight of the generated images")
    args = ap.parse_args(argv)
    model, processor = shapes_model(args)
    synth = SynthesisEngine(model, processor, max_batch_size=32)
    rng = np.random.default_rng(args.seed)
    wanted = [random_scene(rng) for _ in range(args.n)]
    requests = [{"prompt": caption(s), "seed": 1000 + i, "cfg_weight": args.cfg} for i, s in enumerate(wanted)]
    t0 = time.perf_counter()
    curated = CuratedSynthesis(synth, QualityOptions(score=True, best_of=args.best_of))
    candidates, owners = curated.expand(requests)
    results = synth.generate(candidates)
    best = curated.complete(candidates, owners, results)
    # every candidate was scored: candidate 0 of each request (its own seed) is what best_of 1 gives
    single = [r for (_, j), r in zip(owners, results, strict=True) if j == 0]
    ok_single = [correct(judge(r.image), s.attributes())["all"] for r, s in zip(single, wanted, strict=True)]
    ok_best = [correct(judge(r.image), s.attributes())["all"] for r, s in zip(best, wanted, strict=True)]
    scores = np.array([r.score for r in single], dtype=np.float32)
    report: dict[str, Any] = {
        "model": args.model,
        "n": args.n,
        "cfg_weight": args.cfg,
        "score_vs_judge": score_vs_judge(scores, ok_single),
        "ranking_auroc": ranking(curated.reader, [r.image for r in single], wanted, args.seed),
        # the same on drawn scenes: how well the model reads, apart from how well it draws
        "ranking_auroc_drawn": ranking(curated.reader, [draw(s, rng=rng) for s in wanted], wanted, args.seed),
        "best_of": {
            "k": args.best_of,
            "all_correct_best_of_1": round(float(np.mean(ok_single)), 4),
            f"all_correct_best_of_{args.best_of}": round(float(np.mean(ok_best)), 4),
            "gain_points": round(100 * (float(np.mean(ok_best)) - float(np.mean(ok_single))), 1),
            "winner_was_candidate_0": round(float(np.mean([r.candidate == 0 for r in best])), 4),
        },
        "filtering": filtering(scores, ok_single),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    plot(report["filtering"], Path(args.out).with_suffix(".png"))
    if not args.skip_cost:
        report["score_cost"] = score_cost(1)
    return write_report(report, args.out)


if __name__ == "__main__":
    main()
