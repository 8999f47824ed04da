"""Tiny checkpoints shaped for one kind of test, beside ``janus.checkpoints.write_tiny_checkpoint``."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def grid_10_model(directory: Path, seed: int = 3):
    """(model, processor) of a tiny checkpoint whose VQ makes 20 px images from a 10 x 10 code grid
    (gen_vision_config ``image_size``; 2 px per code): 100 codes per image keep decoding tests quick."""
    from janus.checkpoints import write_tiny_checkpoint
    from janus.models import MultiModalityCausalLM, VLChatProcessor

    path = write_tiny_checkpoint(directory, seed=seed, vq_ch_mult=(1, 2))
    cfg = json.loads((path / "config.json").read_text())
    cfg["gen_vision_config"]["params"]["image_size"] = 20
    (path / "config.json").write_text(json.dumps(cfg))
    return MultiModalityCausalLM.from_pretrained(path, dtype=torch.float32), VLChatProcessor.from_pretrained(path)
