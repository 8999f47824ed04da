"""Resumable training state under ``--work``, starting from a shipped checkpoint, and the LR schedule."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

logger = logging.getLogger("training.shapes")


def resume(path: Path, model, opt, stage: str) -> tuple[int, int]:
    """Load a stage's saved state, if any; returns the step to continue from and the step the optimizer's
    moments start at (0, or the step a run started from a checkpoint's weights alone: see ``init_from``)."""
    if not path.exists():
        return 0, 0
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    if state["opt"] is not None:
        opt.load_state_dict(state["opt"])
    logger.info("%s: resuming at step %d", stage, state["step"])
    return int(state["step"]), int(state.get("fresh_optimizer_at", 0))


def init_from(model, checkpoint: Path, work: Path, vq_steps: int, llm_step: int) -> None:
    """Start from a shipped checkpoint's weights instead of a ``--work`` folder: writes stage states that
    say the VQ is trained and the LLM is at ``llm_step``, with fresh optimizer moments (a checkpoint holds
    no optimizer state; the LR warms up again from there). Does nothing once the LLM state exists, so the
    same command resumes an interrupted run."""
    from safetensors.torch import load_file

    llm_state = work / "llm_state.pt"
    if llm_state.exists():
        return
    state = {k: v.float() for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    work.mkdir(parents=True, exist_ok=True)
    vq = model.gen_vision_model
    torch.save({"model": vq.state_dict(), "opt": None, "step": vq_steps}, work / "vq_state.pt")
    torch.save(
        {"model": model.state_dict(), "opt": None, "step": llm_step, "fresh_optimizer_at": llm_step},
        llm_state,
    )
    logger.info("initialised from %s at LLM step %d (fresh optimizer)", checkpoint, llm_step)


def lr_at(peak: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
