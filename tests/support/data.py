"""Facts the tests check against, kept in the repository (tests/data) so that any clone runs them."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


def official_tensors(size: str) -> dict[str, list[int]]:
    """Every tensor name and shape of the module tree that the official Janus-Pro checkpoint of
    ``size`` ("1b" or "7b") loads into: the project's reference manifests, copied unchanged."""
    return json.loads((DATA / f"janus-pro-{size}-tensors.json").read_text())["tensors"]
