"""Tiny checkpoints shaped for one kind of test, beside ``janus.checkpoints.write_tiny_checkpoint``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: the jobs' and the server's checkpoint (``model_dir``): a 12 x 12 code grid, 2 px per code
JOB_GRID = 12
JOB_IMAGE_PX = 2 * JOB_GRID


def write_grid_checkpoint(directory: Path, grid: int, seed: int) -> Path:
    """A tiny checkpoint whose 2-level VQ (2 px per code) makes ``2 * grid`` px images from a ``grid`` x
    ``grid`` code grid (gen_vision_config ``image_size``); the understanding side keeps 384 px."""
    from janus.checkpoints import write_tiny_checkpoint

    path = write_tiny_checkpoint(directory, seed=seed, vq_ch_mult=(1, 2))
    cfg = json.loads((path / "config.json").read_text())
    cfg["gen_vision_config"]["params"]["image_size"] = 2 * grid
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def grid_10_model(directory: Path, seed: int = 3):
    """(model, processor) of a tiny checkpoint with a 10 x 10 code grid (20 px images): 100 codes per
    image keep decoding tests quick."""
    from janus.models import MultiModalityCausalLM, VLChatProcessor

    path = write_grid_checkpoint(directory, 10, seed)
    return MultiModalityCausalLM.from_pretrained(path, dtype=torch.float32), VLChatProcessor.from_pretrained(path)
