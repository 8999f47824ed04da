"""bf16's rounding step, the unit the bf16 tests state their bounds in."""

from __future__ import annotations

import torch


def bf16_ulp(x: torch.Tensor | float) -> torch.Tensor | float:
    """The spacing of bf16 numbers at ``|x|``: 2^-7 relative to its power of two (8 significant bits);
    elementwise for a tensor, a float for a float."""
    t = torch.as_tensor(x, dtype=torch.float32).abs().clamp_min(torch.finfo(torch.float32).tiny)
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(t)))
    return ulp if isinstance(x, torch.Tensor) else float(ulp)
