"""The shapes world: scenes, their one-sentence description, and how they are drawn.

Fixed on purpose, so that code that does not use the model (``judge.py``) can check what the model
draws and says: one filled shape on a plain background, exact palette colours, five positions.
Prompt and caption grammar (exactly): ``a {color} {shape} on the {position}, {background} background``,
and ``a {color} {shape} in the center, {background} background`` for the centre.
Every purple triangle and every orange circle is held out of training (composition, not memory).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS = tuple(PALETTE)
BACKGROUNDS = COLORS  # any palette colour other than the shape's
SHAPES = ("circle", "square", "triangle")
#: shape centre as fractions of (width, height)
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
#: each attribute of a scene (``Scene.attributes()``'s keys, in the caption's order) and its values
VALUES: dict[str, tuple[str, ...]] = {
    "color": COLORS,
    "shape": SHAPES,
    "position": tuple(POSITIONS),
    "background": BACKGROUNDS,
}
ATTRIBUTES = tuple(VALUES)
HELD_OUT = frozenset({("purple", "triangle"), ("orange", "circle")})
SIZE = 0.35  # shape extent as a fraction of the image side (drawn exactly)
#: the variation of a drawn scene (``draw(..., rng)``), each well inside what the judge reads right:
#: the shape's centroid moves up to this fraction of the side on each axis (the judge's bands are 0.125
#: from each position's centre), its extent is drawn from SIZE_RANGE, each channel of the shape's and the
#: background's colour moves up to JITTER_SHADE (the nearest two palette entries are 83 apart), and squares
#: and triangles turn up to JITTER_ROTATION degrees (at 12 the judge starts to read squares as circles)
JITTER_POSITION = 0.07
SIZE_RANGE = (0.28, 0.42)
JITTER_SHADE = 12.0
JITTER_ROTATION = 6.0
MARGIN = 0.02  # a jittered shape stays this far inside the image
IMAGE_SIZE = 96


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    position: str
    background: str

    def __post_init__(self) -> None:
        if self.color not in PALETTE or self.background not in PALETTE:
            raise ValueError(f"colours must be in the palette {COLORS}: {self}")
        if self.color == self.background:
            raise ValueError(f"the shape and the background have the same colour: {self}")
        if self.shape not in SHAPES or self.position not in POSITIONS:
            raise ValueError(f"unknown shape or position: {self}")

    @property
    def held_out(self) -> bool:
        return (self.color, self.shape) in HELD_OUT

    @property
    def text(self) -> str:
        return caption(self)

    def attributes(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "position": self.position, "background": self.background}


def place(scene: Scene) -> str:
    """Where the shape is, in the grammar's words: "in the center" or "on the <position>"."""
    return "in the center" if scene.position == "center" else f"on the {scene.position}"


def caption(scene: Scene) -> str:
    """The scene in the fixed grammar (the prompt that asks for it, and the caption that describes it)."""
    return f"a {scene.color} {scene.shape} {place(scene)}, {scene.background} background"


_WORD = r"([a-z]+)"
_GRAMMAR = re.compile(
    rf"\ba {_WORD} {_WORD} (?:on the {_WORD}|in the (center)), {_WORD} background\b", re.IGNORECASE
)


def parse_caption(text: str | None) -> Scene | None:
    """The scene a text in the grammar describes (first match, case-insensitive); None if it does not parse."""
    if not text:
        return None
    m = _GRAMMAR.search(text)
    if m is None:
        return None
    color, shape, side, center, background = (g.lower() if g else g for g in m.groups())
    try:
        return Scene(color, shape, side or center, background)
    except ValueError:
        return None


def all_scenes(held_out: bool | None = False) -> list[Scene]:
    """Every scene: in-distribution only (False), held-out only (True), or all (None)."""
    scenes = [
        Scene(c, s, p, b)
        for c in COLORS
        for s in SHAPES
        for p in POSITIONS
        for b in BACKGROUNDS
        if b != c
    ]
    return scenes if held_out is None else [s for s in scenes if s.held_out == held_out]


def random_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
    """A uniformly drawn scene, in-distribution (default) or from the held-out combinations."""
    while True:
        color = COLORS[rng.integers(len(COLORS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        if ((color, shape) in HELD_OUT) != held_out:
            continue
        background = COLORS[rng.integers(len(COLORS))]
        if background == color:
            continue
        return Scene(color, shape, tuple(POSITIONS)[rng.integers(len(POSITIONS))], background)


def one_changed(
    scene: Scene,
    rng: random.Random,
    attribute: str | None = None,
    fields: tuple[str, ...] = ATTRIBUTES,
    held_out_ok: bool = True,
) -> Scene:
    """The scene with exactly one attribute changed: ``attribute``, or one drawn from ``fields`` on each
    try. Never a shape in its own background's colour; never a held-out combination unless
    ``held_out_ok``. The negatives of the yes/no training pairs and of the score's AUROC."""
    while True:
        field = attribute if attribute is not None else rng.choice(fields)
        attrs = scene.attributes()
        attrs[field] = rng.choice([v for v in VALUES[field] if v != attrs[field]])
        if attrs["color"] == attrs["background"]:
            continue
        other = Scene(**attrs)
        if held_out_ok or not other.held_out:
            return other


def _outline(shape: str, extent: float, degrees: float) -> list[tuple[float, float]] | None:
    """The polygon of a square or an upright triangle ``extent`` wide, turned by ``degrees``, around its
    area centroid (fractions of the side); None for a circle."""
    h = extent / 2
    if shape == "circle":
        return None
    corners = [(-h, -h), (h, -h), (h, h), (-h, h)] if shape == "square" else [(0, -4 * h / 3), (h, 2 * h / 3), (-h, 2 * h / 3)]
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [(x * c - y * s, x * s + y * c) for x, y in corners]


def _shade(rgb: tuple[int, int, int], rng: np.random.Generator | None) -> tuple[int, int, int]:
    if rng is None:
        return rgb
    return tuple(int(round(v)) for v in np.clip(np.array(rgb) + rng.uniform(-JITTER_SHADE, JITTER_SHADE, 3), 0, 255))


def draw(scene: Scene, size: int = IMAGE_SIZE, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as uint8 [size, size, 3]: exactly (palette colours, SIZE, upright, centred on its
    position), or with ``rng`` one of its variations (position, size, shade, rotation; see JITTER_*)."""
    cx, cy = POSITIONS[scene.position]
    extent, degrees = SIZE, 0.0
    if rng is not None:
        cx += rng.uniform(-JITTER_POSITION, JITTER_POSITION)
        cy += rng.uniform(-JITTER_POSITION, JITTER_POSITION)
        extent = rng.uniform(*SIZE_RANGE)
        degrees = rng.uniform(-JITTER_ROTATION, JITTER_ROTATION) if scene.shape != "circle" else 0.0
    fill, background = _shade(PALETTE[scene.color], rng), _shade(PALETTE[scene.background], rng)
    points = _outline(scene.shape, extent, degrees)
    xs, ys = zip(*points, strict=True) if points else ((-extent / 2, extent / 2),) * 2
    cx = min(max(cx, MARGIN - min(xs)), 1 - MARGIN - max(xs))
    cy = min(max(cy, MARGIN - min(ys)), 1 - MARGIN - max(ys))
    image = PIL.Image.new("RGB", (size, size), background)
    pen = PIL.ImageDraw.Draw(image)
    if points is None:
        h = extent / 2
        pen.ellipse(((cx - h) * size, (cy - h) * size, (cx + h) * size, (cy + h) * size), fill=fill)
    else:
        pen.polygon([((cx + x) * size, (cy + y) * size) for x, y in points], fill=fill)
    return np.asarray(image).copy()
