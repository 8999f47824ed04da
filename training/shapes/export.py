"""The trained weights in the official on-disk layout, loaded like any Janus-Pro checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def export(model, skeleton: Path, out: Path) -> None:
    """The skeleton's files plus the weights as bf16 safetensors (Janus-Pro ships bf16), written to a
    temporary folder and moved over ``out`` whole."""
    from janus.checkpoints import save_state_dict

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(skeleton, tmp)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    state["gen_vision_model.quantize.codebook_used"] = state[
        "gen_vision_model.quantize.codebook_used"
    ].float()
    save_state_dict(state, tmp, weights_format="safetensors")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
