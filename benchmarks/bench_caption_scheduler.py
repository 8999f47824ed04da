"""Captioning images/s: the static batched engine against the continuous-batching scheduler, when
answers have different lengths (a short answer frees its slot for the next image at once).

    python -m benchmarks.bench_caption_scheduler [--config small] [--images 64] [--slots 16] [--threads 1]

One random model of ``--config`` (bench_engines' configs), ``--images`` images whose answer lengths
are drawn from 8 .. ``--max-new`` tokens (``max_new_tokens`` stands in for where EOS would fall: a
random model never says EOS), greedy. The static engine runs ``--slots`` images per batch (each batch
lasts as long as its longest answer); the scheduler keeps ``--slots`` rows busy. Same weights, same
requests, same process; the best of ``--repeats`` is reported. Writes
benchmarks/results/caption_scheduler.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_engines import CONFIGS, caption_images
from janus.checkpoints import write_tiny_checkpoint
from janus.engine import CaptionEngine, load_model_and_processor
from janus.engine.scheduler import Scheduler
from janus.utils.cli import OneLineParser

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> dict:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "caption_scheduler.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(Path(tmp) / "m", **CONFIGS[args.config])
        model, processor = load_model_and_processor(str(path), dtype=args.dtype, device="cpu")
    engine = CaptionEngine(model, processor, max_batch_size=args.slots)
    lengths = np.random.default_rng(0).integers(8, args.max_new + 1, size=args.images).tolist()
    images = caption_images(args.images)
    requests = [{"image": im, "max_new_tokens": n} for im, n in zip(images, lengths, strict=True)]

    def static() -> list[str]:
        return [r.text for r in engine.generate(requests)]

    def scheduled() -> list[str]:
        scheduler = Scheduler(engine, slots=args.slots)
        tickets = [scheduler.submit(r) for r in requests]
        scheduler.run_until_idle()
        return [t.result.text for t in tickets]

    engine.generate(requests[:2])  # warm-up
    times: dict[str, list[float]] = {"static": [], "scheduler": []}
    texts = {}
    for _ in range(args.repeats):
        for name, run in (("static", static), ("scheduler", scheduled)):
            t0 = time.perf_counter()
            texts[name] = run()
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    report = {
        "config": args.config,
        "dtype": args.dtype,
        "threads": args.threads,
        "images": args.images,
        "slots": args.slots,
        "answer_tokens": {"min": min(lengths), "max": max(lengths), "mean": round(float(np.mean(lengths)), 1)},
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "images_per_s": {k: round(args.images / v, 3) for k, v in best.items()},
        "speedup": round(best["static"] / best["scheduler"], 3),
        "same_captions": texts["static"] == texts["scheduler"],
    }
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
