"""Is this process's device still usable after an error?

Some CUDA errors poison the process's CUDA context: after an illegal memory access, an uncorrectable
ECC error or a device-side assert, every later kernel launch and copy in that process fails too, so
a model actor that lives on fails every batch it is given. The cure is a fresh process. Running out
of memory is not one of them: the engines split the batch and go on (``common.BatchEngine``).

The Ray Data pool (``pipeline.crash_guard``) exits such an actor's process so that Ray restarts it and
retries its batch, as Ray Data LLM does for a dead vLLM engine (ray-project/ray PR #60145); a Serve
replica reports itself unhealthy so that Serve replaces it. Both ask ``fatal_device_error``. No torch
at import: the crash guard imports this without the model's stack.
"""

from __future__ import annotations

import sys

#: CUDA's own messages (``cudaGetErrorString``) for the errors that leave a context unusable, as torch
#: raises them ("CUDA error: an illegal memory access was encountered", torch.AcceleratorError)
FATAL_DEVICE_MESSAGES = (
    "an illegal memory access was encountered",  # cudaErrorIllegalAddress
    "uncorrectable ECC error encountered",  # cudaErrorECCUncorrectable
    "unspecified launch failure",  # cudaErrorLaunchFailure (also a GPU that fell off the bus)
    "device-side assert triggered",  # cudaErrorAssert
    "misaligned address",  # cudaErrorMisalignedAddress
    "an illegal instruction was encountered",  # cudaErrorIllegalInstruction
    "invalid program counter",  # cudaErrorInvalidPc
    "the launch timed out and was terminated",  # cudaErrorLaunchTimeout
    "uncorrectable NVLink error was detected",  # cudaErrorNvlinkUncorrectable
    "hardware stack error",  # cudaErrorHardwareStackError
    "CUBLAS_STATUS_EXECUTION_FAILED",  # a cuBLAS kernel that faulted
)
#: errors a batch survives: the engines split it and retry (torch.OutOfMemoryError is a RuntimeError)
RECOVERABLE_TYPES = ("OutOfMemoryError",)


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the errors it was raised from or during (Ray and our wrappers re-raise)."""
    seen: list[BaseException] = []
    while exc is not None and all(exc is not s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _cuda_probe_fails() -> str | None:
    """Why the CUDA devices this process already uses fail a tiny round trip (None: they pass, or this
    process never initialised CUDA, so there is no context to be poisoned)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    try:
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)
            torch.ones(1, device=f"cuda:{index}").add_(1).item()
    except Exception as exc:  # any failure here means the device cannot run the next batch
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return None


def fatal_device_error(exc: BaseException) -> str | None:
    """Why ``exc`` leaves this process unable to use its device (a line for the log), or None when the
    process can go on: a known fatal CUDA message anywhere in the chain, or any other error after which
    the CUDA device fails a probe. Out of memory is never fatal."""
    chain = _chain(exc)
    if any(type(e).__name__ in RECOVERABLE_TYPES for e in chain):
        return None
    for e in chain:
        text = " ".join(str(e).split())
        for message in FATAL_DEVICE_MESSAGES:
            if message in text:
                return f"{type(e).__name__}: {message}"
    broken = _cuda_probe_fails()
    return f"the device fails a probe after {type(exc).__name__} ({broken})" if broken else None
