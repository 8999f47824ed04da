"""What both model actors share: where the model comes from, which device it runs on, and the
rows -> engine requests -> columns fan-out (rows that already failed upstream skip the model)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from janus.engine import OK, Result, load_model_and_processor
from pipeline.model_ref import resolve_model_ref

from .metrics import BatchMetrics

logger = logging.getLogger(__name__)


def pick_device(requested: str) -> str:
    """``auto`` -> cuda when this process can see a GPU, else cpu (also for fake Ray GPUs)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %s requested but CUDA is not available here; using cpu", requested)
        return "cpu"
    return requested


def load_for_actor(model: dict[str, Any]):
    """``model``: the job's model section (path, dtype, device, storage_options, cache_dir)."""
    dtype = None if model.get("dtype", "auto") == "auto" else model["dtype"]
    return load_model_and_processor(
        resolve_model_ref(model["path"], model.get("cache_dir")),
        dtype=dtype,
        device=pick_device(model.get("device", "auto")),
        storage_options=model.get("storage_options") or None,
        cache_dir=model.get("cache_dir"),
    )


class ModelActor:
    """One full model per actor. Ray Data calls it on batches of rows; Serve calls ``generate``.

    Subclasses name their engine and say how a row becomes a request and results become columns.
    Input rows carry ``status``/``error`` from earlier stages: rows already failed skip the model.
    """

    engine_class: ClassVar[type]

    def __init__(self, model: dict[str, Any], engine: dict[str, Any] | None = None):
        t0 = time.perf_counter()
        net, processor = load_for_actor(model)
        self.engine = self.engine_class(net, processor, **(engine or {}))
        self.runner: Any = self.engine  # what ``generate`` calls: the engine, or a wrapper around it
        self.model_name = model.get("name") or model["path"]
        self.calls = 0
        self.metrics = BatchMetrics(type(self).__name__, self.model_name)
        logger.info(
            "%s ready on %s in %.1fs (pid %d)",
            type(self).__name__,
            self.engine.device,
            time.perf_counter() - t0,
            os.getpid(),
        )

    def generate(self, requests: list[dict[str, Any]]) -> list[Result]:
        """Plain engine call, shared with the online deployment."""
        self.calls += 1
        return self.runner.generate([self.with_defaults(r) for r in requests])

    def expand(self, requests: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
        """The engine requests that answer ``requests`` (e.g. best-of-k candidates), and what ``complete``
        needs to turn their results back into one result each: lets a scheduler run them instead."""
        return [self.with_defaults(r) for r in requests], None

    def complete(self, engine_requests: list[Any], plan: Any, results: list[Result]) -> list[Result]:
        return results

    def complete_many(self, calls: list[tuple[list[Any], Any, list[Result]]]) -> list[list[Result]]:
        """``complete`` for several ``expand`` calls at once (Serve: requests that finished together);
        an actor that reads its results back with the model overrides it to read them in one batch."""
        return [self.complete(*call) for call in calls]

    def with_defaults(self, request: dict[str, Any]) -> dict[str, Any]:
        """The actor's configured settings under a request's own (e.g. top_k for synthesis)."""
        return request

    def request(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        raise NotImplementedError

    def run_rows(self, batch: dict[str, np.ndarray]) -> tuple[list[int], list[Result], list[str], list]:
        """(rows that ran, their results, every row's status, every row's error): failed rows stay failed."""
        n = len(batch["key"])
        status = [OK if s in (None, OK) else s for s in batch.get("status", [None] * n)]
        error = list(batch.get("error", [None] * n))
        todo = [i for i in range(n) if status[i] == OK]
        results = self.generate([self.request(batch, i) for i in todo]) if todo else []
        for i, res in zip(todo, results, strict=True):
            status[i], error[i] = res.status, res.error
        return todo, results, status, error


def per_row_seconds(res: Result) -> float:
    """A row's share of its batch's model time."""
    return res.timings.get("total_s", 0.0) / max(res.timings.get("batch_size", 1), 1)


def objects(values: Sequence[Any]) -> np.ndarray:
    return np.array(list(values), dtype=object)

