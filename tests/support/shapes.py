"""The shipped shapes model's end-to-end checks' shared parts: the prompts, the guidance weight and the
bounds the judge holds the images to (tests/test_shapes_model.py in process, tests/test_serve_shapes.py
over HTTP). Bounds are the measured accuracies less a margin (benchmarks/results/eval_shapes.json)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

from janus.shapes import Scene, judge
from janus.shapes.judge import correct

#: the guidance weight the end-to-end checks draw at: DeepSeek's default
CFG = 5.0
#: per-attribute accuracy measured on 128 prompts at CFG (colour 0.87, shape 0.59, position 0.86,
#: background 0.98: benchmarks/results/eval_shapes.json) less about two standard errors of 8 draws, as
#: fractions of the 8 PROMPTS. Their backgrounds are 8 different colours, so an image stored under another
#: prompt's key fails "background" (the attribute the model gets right most often).
MIN_IMAGE = {"background": 0.875, "color": 0.625, "shape": 0.25, "position": 0.5}
PROMPTS = [
    Scene("red", "circle", "left", "blue"),
    Scene("green", "square", "top", "white"),
    Scene("yellow", "triangle", "bottom", "black"),
    Scene("blue", "square", "right", "yellow"),
    Scene("white", "circle", "center", "red"),
    Scene("black", "triangle", "left", "green"),
    Scene("orange", "square", "right", "purple"),
    Scene("purple", "circle", "bottom", "orange"),
]


@cache
def shapes_vq():
    """The shipped checkpoint's image geometry (``grid`` codes a side, ``image_tokens`` an image, the
    generated side ``image_size`` in pixels), read from its config.json as a job's driver reads it."""
    from janus.models.vq_config import VQConfig
    from pipeline.model_ref import resolve_model_ref

    config = json.loads((Path(resolve_model_ref("shapes")) / "config.json").read_text())
    return VQConfig.from_params(config["gen_vision_config"]["params"])


def accuracy(marks: list[dict[str, bool]]) -> dict[str, float]:
    return {a: float(np.mean([m[a] for m in marks])) for a in marks[0]}


def assert_right(images, scenes) -> None:
    """Each image judged against the scene its prompt asked for; every attribute at its bound."""
    got = accuracy([correct(judge(im), s.attributes()) for im, s in zip(images, scenes, strict=True)])
    assert all(got[a] >= bound for a, bound in MIN_IMAGE.items()), (got, MIN_IMAGE)
