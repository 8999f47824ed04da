"""Synthesizer: one full Janus model per actor; Ray Data calls it on batches of prompt rows."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from janus.engine import SynthesisEngine

from .common import load_model_and_processor

logger = logging.getLogger(__name__)


class Synthesizer:
    """Callable class for ``map_batches`` (and the Serve deployment): prompt rows -> image rows.

    Input columns: key, prompt, seed, cfg_weight, temperature (+ status/error set by the reader for
    rows that were already bad). Output: the input columns plus status, error, image (uint8
    [H, W, 3]; zeros for failed rows), tokens, timing columns and the model name.
    """

    def __init__(
        self, model: dict[str, Any], engine: dict[str, Any] | None = None, sampling: dict | None = None
    ):
        t0 = time.perf_counter()
        net, processor = load_model_and_processor(model)
        self.engine = SynthesisEngine(net, processor, **(engine or {}))
        self.model_name = model.get("name") or model["path"]
        self.sampling = {k: v for k, v in (sampling or {}).items() if k in ("top_k", "top_p")}
        self.calls = 0
        logger.info(
            "Synthesizer ready on %s in %.1fs (pid %d)",
            self.engine.device,
            time.perf_counter() - t0,
            os.getpid(),
        )

    def generate(self, requests: list[dict[str, Any]]):
        """Plain engine call, shared with the online deployment: the configured sampling applies to both."""
        self.calls += 1
        return self.engine.generate([{**self.sampling, **r} for r in requests])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        status = list(batch.get("status", [None] * n))
        error = list(batch.get("error", [None] * n))
        todo = [i for i in range(n) if status[i] != "error"]
        requests = [
            {
                "prompt": batch["prompt"][i],
                "seed": int(batch["seed"][i]),
                "cfg_weight": float(batch["cfg_weight"][i]),
                "temperature": float(batch["temperature"][i]),
            }
            for i in todo
        ]
        results = self.generate(requests) if requests else []
        size = self.engine.image_size
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        tokens = np.zeros((n, 576), dtype=np.int32)
        seconds = np.zeros(n, dtype=np.float64)
        for i, res in zip(todo, results, strict=True):
            status[i], error[i] = res.status, res.error
            if res.ok:
                images[i], tokens[i] = res.image, res.tokens
                seconds[i] = res.timings.get("total_s", 0.0) / max(res.timings.get("batch_size", 1), 1)
        out = dict(batch)
        out.update(
            status=np.array(status, dtype=object),
            error=np.array(error, dtype=object),
            image=images,
            tokens=tokens,
            seconds=seconds,
            model=np.array([self.model_name] * n, dtype=object),
        )
        return out
