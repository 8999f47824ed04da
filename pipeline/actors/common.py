"""What both model actors share: where the model comes from and which device it runs on."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

TINY = "tiny"


def resolve_model_ref(path: str, cache_dir: str | None = None) -> str:
    """``tiny`` -> a tiny checkpoint written once on this machine (the embedded demo model)."""
    if path != TINY:
        return path
    from janus.models.hub import default_cache_dir
    from janus.testing import write_tiny_checkpoint

    target = Path(cache_dir or default_cache_dir()) / "tiny-janus-v1"
    if not (target / "config.json").exists():
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        write_tiny_checkpoint(tmp, seed=0)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; theirs is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def pick_device(requested: str) -> str:
    """``auto`` -> cuda when this process can see a GPU, else cpu (also for fake Ray GPUs)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %s requested but CUDA is not available here; using cpu", requested)
        return "cpu"
    return requested


def load_model_and_processor(model: dict[str, Any]):
    """``model``: the job's model section (path, dtype, device, storage_options, cache_dir)."""
    from janus.models import VLChatProcessor
    from janus.models.loading import load_janus_model

    ref = resolve_model_ref(model["path"], model.get("cache_dir"))
    device = pick_device(model.get("device", "auto"))
    dtype = None if model.get("dtype", "auto") == "auto" else model["dtype"]
    opts = model.get("storage_options") or None
    net = load_janus_model(
        ref, dtype=dtype, device=device, storage_options=opts, cache_dir=model.get("cache_dir")
    )
    processor = VLChatProcessor.from_pretrained(ref, storage_options=opts, cache_dir=model.get("cache_dir"))
    return net, processor
