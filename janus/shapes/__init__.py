"""The shapes world: a drawn data set, its judge, and the small Janus trained on it (``model.path: shapes``).

Everything here but ``train.py`` is run-time code: the grammar, the drawing and the numpy judge that
reads an image's attributes back without any model. ``train.py`` is never imported at run time.
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
