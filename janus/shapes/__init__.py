"""The shapes world: a drawn data set, its judge, and the small Janus trained on it (``model.path: shapes``).

Run-time code only: the grammar, the drawing and the numpy judge that reads an image's attributes back
without any model, plus the shipped checkpoint. Its trainer is ``training.shapes``, outside the package.
"""

from .data import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT,
    PALETTE,
    POSITIONS,
    SHAPES,
    Scene,
    caption,
    draw,
    parse_caption,
    random_scene,
)
from .judge import judge

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "HELD_OUT",
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "Scene",
    "caption",
    "draw",
    "judge",
    "parse_caption",
    "random_scene",
]
