"""The trainer's quick check every ``--eval-every`` steps: images generated and captions of drawn scenes,
judged by numpy, and the score's AUROC (the full measurements are benchmarks/eval_shapes.py and
benchmarks/eval_quality.py)."""

from __future__ import annotations

import random

import numpy as np
import torch

from janus.engine import CaptionEngine, SynthesisEngine
from janus.engine.quality import Reader
from janus.shapes.data import Scene, caption, parse_caption, random_scene
from janus.shapes.judge import auroc, correct, judge

from .examples import perturbed
from .model import drawn


def yes_no_auroc(reader: Reader, images: np.ndarray, scenes: list[Scene], rng: random.Random) -> float:
    """How well the self-verification score tells each image's own scene from that scene with one
    attribute changed: P(a right pair outscores a wrong one)."""
    features = reader.features(list(images))
    own = reader.scores(features, [caption(s) for s in scenes])
    other = reader.scores(features, [caption(perturbed(s, rng)) for s in scenes])
    return auroc(own, other)


def _generated_accuracy(
    synth: SynthesisEngine, scenes: list[Scene], cfg_weight: float
) -> list[dict[str, bool]]:
    results = synth.generate(
        [
            {"prompt": caption(s), "seed": i, "cfg_weight": cfg_weight, "temperature": 1.0}
            for i, s in enumerate(scenes)
        ]
    )
    return [correct(judge(r.image), s.attributes()) for r, s in zip(results, scenes, strict=True)]


@torch.no_grad()
def evaluate(model, processor, n: int, seed: int, cfg_weight: float = 5.0) -> dict[str, float]:
    """Generate ``n`` in-distribution prompts and caption ``n`` drawn scenes; judge both with numpy."""
    model.eval()
    rng = np.random.default_rng([seed, 4])
    scenes = [random_scene(rng) for _ in range(n)]
    synth = SynthesisEngine(model, processor, max_batch_size=n)
    marks = _generated_accuracy(synth, scenes, cfg_weight)
    out = {f"gen_{k}": float(np.mean([m[k] for m in marks])) for k in marks[0]}
    out["gen_all_cfg1"] = float(np.mean([m["all"] for m in _generated_accuracy(synth, scenes, 1.0)]))
    captioner = CaptionEngine(model, processor, max_batch_size=n)
    images = drawn(scenes, rng)
    texts = captioner.generate([{"image": im, "max_new_tokens": 24} for im in images])
    parsed = [parse_caption(t.text) for t in texts]
    out["caption_all"] = float(np.mean([p == s for p, s in zip(parsed, scenes, strict=True)]))
    out["yes_no_auroc"] = yes_no_auroc(Reader(captioner), images, scenes, random.Random(seed))
    model.train()
    return out
