"""The device's memory as the suite sees it: freeing it between items, and the caching allocator's
resident and peak memory around a timed call (nothing on the CPU)."""

from __future__ import annotations

from collections.abc import Callable


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_gib(device) -> dict[str, float] | None:
    """The caching allocator's view: allocated now, and the peak since the last reset."""
    import torch

    if device.type != "cuda":
        return None
    return {
        "allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
    }


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timed_with_memory(fn: Callable[[], dict], device) -> Callable[[], dict]:
    """``fn`` with the allocator's resident memory before and its peak during the call in its info."""

    def run() -> dict:
        reset_peak(device)
        before = memory_gib(device)
        info = fn()
        after = memory_gib(device)
        if before is not None:
            info["memory"] = {
                "resident_before_gib": before["allocated_gib"],
                "peak_gib": after["peak_gib"],
                "working_gib": after["peak_gib"] - before["allocated_gib"],
            }
        return info

    return run
