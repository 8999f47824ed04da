"""What both engines share: the result type, loading, request checks, memory planning, and the
split-and-retry loop that keeps one oversized batch from failing every row in it."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar

import torch

from .checks import check_fields
from .decoder import KVCacheDecoder
from .status import CANCELLED, ERROR, INTERNAL, INVALID_REQUEST, OK, OUT_OF_MEMORY  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request that cannot be run; becomes that row's error, never the batch's."""


@dataclass
class Result:
    status: str = OK
    error: str | None = None
    code: str | None = None  # INVALID_REQUEST or OUT_OF_MEMORY when the request failed
    timings: dict[str, float] = field(default_factory=dict)
    decode_passes: int | None = None  # forward passes that chose its tokens (the prefill's included)
    decode_method: str | None = None  # "off" (one token per pass), "jacobi" or "coupled"

    @property
    def ok(self) -> bool:
        return self.status == OK

    @classmethod
    def failed(cls, code: str, message: str) -> Result:
        return cls(status=ERROR, error=message, code=code)


def load_model_and_processor(
    path: str, *, dtype=None, device=None, storage_options=None, cache_dir=None
) -> tuple[Any, Any]:
    """A checkpoint (an embedded model's name, local dir, hub id or fsspec URL) -> (MultiModalityCausalLM,
    VLChatProcessor)."""
    from janus.embedded import embedded_path
    from janus.models import MultiModalityCausalLM, VLChatProcessor

    path = embedded_path(path, cache_dir) or path
    model = MultiModalityCausalLM.from_pretrained(
        path, dtype=dtype, device=device, storage_options=storage_options, cache_dir=cache_dir
    )
    processor = VLChatProcessor.from_pretrained(path, storage_options=storage_options, cache_dir=cache_dir)
    return model, processor


def available_memory(device: torch.device) -> int:
    """Bytes the engine may still allocate on ``device``."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # memory PyTorch holds in its cache but no tensor uses is ours to allocate again
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
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


# -- request checks ---------------------------------------------------------------------------------


def coerce_request(cls: type, req: Any, what: str = "a dict") -> Any:
    """A dict -> the request dataclass ``cls`` (unknown keys and None values ignored)."""
    if isinstance(req, cls):
        return req
    if not isinstance(req, dict):
        raise RequestError(f"a request must be {what}, got {type(req).__name__}")
    fields = {k: v for k, v in req.items() if k in cls.__dataclass_fields__ and v is not None}
    for name, f in cls.__dataclass_fields__.items():
        if name not in fields and f.default is MISSING and f.default_factory is MISSING:
            raise RequestError(f"request has no {name!r}")
    return cls(**fields)


def check_sampling(req: Any, *extra: str) -> None:
    """Seed, temperature, top_k, top_p (and the ``extra`` fields) of a request, coerced and checked in
    place against the one rule each field has (``checks.py``)."""
    try:
        check_fields(req, ("seed", "temperature", "top_k", "top_p", *extra))
    except ValueError as exc:
        raise RequestError(str(exc)) from None


# -- the engine skeleton ----------------------------------------------------------------------------


@dataclass
class Prepared:
    """A checked request, ready to batch: its index in the call, the request, and engine-specific data."""

    index: int
    request: Any
    length: int  # prompt tokens: similar lengths batch together
    data: Any = None


class BatchEngine:
    """Plain Python in, numpy out; one engine per actor (not thread-safe).

    ``generate`` checks every request (a bad one becomes its own error result), plans batches that fit
    the device's memory, and runs them; a batch that still runs out of memory is halved and retried,
    so only a request that cannot fit alone fails, with code ``OUT_OF_MEMORY``.
    """

    result_type: ClassVar[type[Result]] = Result

    def __init__(self, model, processor, *, max_batch_size: int, memory_fraction: float):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.language_model.parameters()).dtype
        self.decoder = KVCacheDecoder(model.language_model)
        self.max_batch_size = max_batch_size
        self.memory_fraction = memory_fraction

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=None, device=None, storage_options=None, **options):
        model, processor = load_model_and_processor(
            path, dtype=dtype, device=device, storage_options=storage_options
        )
        return cls(model, processor, **options)

    # -- what each engine defines --------------------------------------------------------------
    def prepare(self, index: int, raw: Any) -> Prepared:
        raise NotImplementedError

    def bytes_per_request(self, prepared: Prepared) -> int:
        """Device memory one request needs inside a batch (KV cache rows and work space)."""
        raise NotImplementedError

    def batch_overhead(self, n: int) -> int:
        """Device memory a batch of ``n`` needs beyond its requests' own."""
        return 0

    def run_batch(self, batch: list[Prepared]) -> list[Result]:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    def generate(self, requests: list[Any]) -> list[Result]:
        """One result per request, in order; a bad request yields an error result, never an exception."""
        results: list[Result | None] = [None] * len(requests)
        prepared: list[Prepared] = []
        for i, raw in enumerate(requests):
            try:
                prepared.append(self.prepare(i, raw))
            except RequestError as exc:
                results[i] = self.result_type.failed(INVALID_REQUEST, str(exc))
        batches, too_big = self.plan(prepared)
        for p in too_big:
            need = self.bytes_per_request(p) + self.batch_overhead(1)
            results[p.index] = self.result_type.failed(
                OUT_OF_MEMORY,
                f"request needs ~{need / 2**20:.0f} MiB, more than the free memory on {self.device}; "
                "shorten it or use a larger device",
            )
        for batch in batches:
            for p, res in zip(batch, self._run_splitting(batch), strict=True):
                results[p.index] = res
        return results  # type: ignore[return-value]

    def budget(self, n: int) -> int:
        return int(available_memory(self.device) * self.memory_fraction) - self.batch_overhead(n)

    def plan(self, prepared: list[Prepared]) -> tuple[list[list[Prepared]], list[Prepared]]:
        """Batches of similar length, at most ``max_batch_size`` and within the memory budget; and the
        requests that do not fit even alone."""
        budget = self.budget(min(self.max_batch_size, max(len(prepared), 1)))
        too_big = [p for p in prepared if self.bytes_per_request(p) > budget]
        fits = sorted((p for p in prepared if p not in too_big), key=lambda p: p.length)
        batches: list[list[Prepared]] = []
        for group in chunks(fits, self.max_batch_size):
            per = max(self.bytes_per_request(p) for p in group)
            batches.extend(chunks(group, max(1, min(len(group), budget // max(per, 1)))))
        return batches, too_big

    def _run_splitting(self, batch: list[Prepared]) -> list[Result]:
        try:
            return self.run_batch(batch)
        except torch.OutOfMemoryError as exc:
            self.decoder.release()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                return [self.result_type.failed(OUT_OF_MEMORY, f"out of memory on {self.device}: {exc}")]
            half = len(batch) // 2
            logger.warning(
                "out of memory with batch %d; retrying as %d + %d", len(batch), half, len(batch) - half
            )
            return self._run_splitting(batch[:half]) + self._run_splitting(batch[half:])
