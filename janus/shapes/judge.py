"""Read a shapes image's attributes back with numpy alone: the oracle of the end-to-end tests.

It never uses the model, so it can judge what the model draws. Background = the palette colour most
of the border is nearest to; shape pixels = those nearest another palette colour; colour = the most
common of those; position = the nearest of the five centres to the shape's centroid; shape = the
template (circle, square, upright triangle) drawn in the shape's bounding box that overlaps it best.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .data import COLORS, PALETTE, POSITIONS

_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # [8, 3]
_CENTRES = np.array([POSITIONS[p] for p in POSITIONS], dtype=np.float32)  # [5, 2]
MIN_SHAPE_FRACTION = 0.02  # fewer shape pixels than this: no shape is drawn


def nearest_colors(image: np.ndarray) -> np.ndarray:
    """Index into ``COLORS`` of the nearest palette entry, per pixel: int [H, W]."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    dist = ((pixels[..., None, :] - _RGB) ** 2).sum(-1)
    return dist.argmin(-1)


def _templates(mask_shape: tuple[int, int], box: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
    """Boolean masks of each shape filling ``box`` (y0, x0, y1, x1 inclusive) in an image of ``mask_shape``."""
    h, w = mask_shape
    y0, x0, y1, x1 = box
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    cy, cx = (y0 + y1 + 1) / 2, (x0 + x1 + 1) / 2
    ry, rx = max((y1 - y0 + 1) / 2, 0.5), max((x1 - x0 + 1) / 2, 0.5)
    inside = (ys >= y0) & (ys <= y1 + 1) & (xs >= x0) & (xs <= x1 + 1)
    circle = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
    depth = (ys - y0) / (2 * ry)  # 0 at the apex, 1 at the base
    triangle = inside & (np.abs(xs - cx) <= depth * rx)
    return {"circle": circle, "square": inside, "triangle": triangle}


def judge(image: np.ndarray) -> dict[str, Any]:
    """Attributes of one image (uint8 [H, W, 3]): color, shape, position, background (None where unread).

    Also returns ``fraction`` (shape pixels / all pixels) and ``iou`` (overlap with the chosen template),
    which say how clean the image is.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3 or min(image.shape[:2]) < 8:
        raise ValueError(f"judge expects an RGB image [H, W, 3], got shape {list(image.shape)}")
    h, w = image.shape[:2]
    labels = nearest_colors(image)
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    background = int(np.bincount(border, minlength=len(COLORS)).argmax())
    out: dict[str, Any] = {
        "color": None,
        "shape": None,
        "position": None,
        "background": COLORS[background],
        "fraction": 0.0,
        "iou": 0.0,
    }
    counts = np.bincount(labels[labels != background], minlength=len(COLORS))
    if counts.sum() < MIN_SHAPE_FRACTION * h * w:
        return out
    color = int(counts.argmax())
    mask = labels == color
    out["color"] = COLORS[color]
    out["fraction"] = float(mask.mean())
    ys, xs = np.nonzero(mask)
    centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5], dtype=np.float32) / np.array([w, h], dtype=np.float32)
    out["position"] = tuple(POSITIONS)[int(((_CENTRES - centroid) ** 2).sum(-1).argmin())]
    # a bounding box that ignores a few stray pixels: trim 1% of the shape's pixels on each side
    (y0, y1), (x0, x1) = np.percentile(ys, [1, 99]), np.percentile(xs, [1, 99])
    box = (int(y0), int(x0), int(y1), int(x1))
    best, best_iou = None, -1.0
    for name, template in _templates((h, w), box).items():
        iou = float((template & mask).sum() / max((template | mask).sum(), 1))
        if iou > best_iou:
            best, best_iou = name, iou
    out["shape"], out["iou"] = best, best_iou
    return out


def correct(verdict: dict[str, Any], expected: dict[str, str]) -> dict[str, bool]:
    """Per attribute: does the verdict match the scene's attributes? Plus ``all``."""
    marks = {k: verdict.get(k) == v for k, v in expected.items()}
    marks["all"] = all(marks.values())
    return marks


def auroc(positives: Any, negatives: Any) -> float:
    """P(a positive outscores a negative), ties counting half (Mann-Whitney): how well a score ranks
    right pairs (image, its own prompt) above wrong ones."""
    pos, neg = np.asarray(positives, dtype=np.float64)[:, None], np.asarray(negatives, dtype=np.float64)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))
