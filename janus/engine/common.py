"""Shared pieces of the two engines: request validation errors, memory budgets, timers."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch


class RequestError(ValueError):
    """A request that cannot be run; becomes that row's error, never the batch's."""


class InsufficientMemoryError(RuntimeError):
    """Even one request does not fit the memory budget of the device."""


def available_memory(device: torch.device) -> int:
    """Bytes the engine may still allocate on ``device``."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(timings: dict[str, float], name: str, device: torch.device):
    """Adds the wall time of the block (device work included) to ``timings[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
