"""environment: the GPU, its driver and the package versions; the copy bandwidth and bf16 matmul rate
measured on random data, the ceilings the throughput sections are held against."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.gpu.device import free_memory
from benchmarks.gpu.plan import Plan
from benchmarks.gpu.record import Recorder
from benchmarks.gpu.section import Section


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }
    for name in (
        "torch",
        "transformers",
        "tokenizers",
        "timm",
        "ray",
        "fastapi",
        "pydantic",
        "numpy",
        "triton",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=p.total_memory / 2**30)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
    return out


def median_time_s(fn: Callable[[], Any], device, repeats: int = 10) -> float:
    """Median wall time of ``fn`` after one warm-up; CUDA events on the GPU."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device) -> dict[str, Any]:
    """Device-to-device copy of random data, bytes read plus written: the ceiling the decode step
    (bound by reading weights and KV cache) is held against."""
    import torch

    n = (2 << 30 if device.type == "cuda" else 64 << 20) // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    seconds = median_time_s(lambda: dst.copy_(src), device)
    return {"bytes": 2 * src.nbytes, "seconds": seconds, "gb_s": 2 * src.nbytes / seconds / 1e9}


def matmul_rate(device) -> dict[str, Any]:
    """A large bf16 (CPU: fp32) matrix product on random data: the arithmetic ceiling."""
    import torch

    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_time_s(lambda: a @ b, device)
    return {"n": n, "dtype": str(dtype), "seconds": seconds, "tflop_s": 2 * n**3 / seconds / 1e12}


def section_environment(rec: Recorder, plan: Plan, work: Path) -> None:
    import torch

    device = torch.device(plan.device)
    rec.item("versions", versions)
    rec.item("copy bandwidth", lambda: copy_bandwidth(device), 2)
    rec.item("bf16 matmul", lambda: matmul_rate(device), 2)
    free_memory()


SECTIONS = (
    Section(
        "environment",
        order=10,
        budget_s=15,
        about="GPU, driver and package versions; the measured copy bandwidth and bf16 matmul rate",
        run=section_environment,
    ),
)
