"""What a run of the suite is: the mode (a GPU, or the CPU dry run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """The real shapes on a GPU; the tiny model on the CPU for ``--dry-run`` (same code, small work).

    What a section measures in each mode (shapes, batches, rows) lives in the section's module, chosen
    with ``pick``, so a section is one file."""

    device: str
    dtype: str  # the production dtype of the throughput sections
    repeats: int
    warmups: bool  # warm-up calls before the timed ones (they matter on a GPU, not for a dry run)
    budgets: bool  # False: no time limits at all, every item runs (a dry run checks the code, not time)

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def pick(self, gpu: T, dry: T) -> T:
        """``gpu`` on the GPU, ``dry`` in the dry run."""
        return gpu if self.gpu else dry


GPU_PLAN = Plan(device="cuda", dtype="bfloat16", repeats=1, warmups=True, budgets=True)
DRY_PLAN = Plan(device="cpu", dtype="float32", repeats=1, warmups=False, budgets=False)
