"""Captioner: one full Janus model per actor; turns preprocessed image rows into caption rows."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from janus.engine import CaptionEngine

from .common import load_model_and_processor

logger = logging.getLogger(__name__)


class Captioner:
    """Callable class for ``map_batches`` (and the Serve deployment).

    Input columns: key, source, pixels (uint8 [S, S, 3], already resized and padded by the CPU
    stage), status/error from that stage. Output: key, source, caption, question, model, tokens,
    finish_reason, status, error, seconds.
    """

    def __init__(
        self, model: dict[str, Any], engine: dict[str, Any] | None = None, caption: dict | None = None
    ):
        t0 = time.perf_counter()
        net, processor = load_model_and_processor(model)
        options = {
            k: v for k, v in (engine or {}).items() if k in ("max_batch_size", "max_images_per_request")
        }
        self.engine = CaptionEngine(net, processor, **options)
        self.model_name = model.get("name") or model["path"]
        self.caption = dict(caption or {})
        self.calls = 0
        logger.info(
            "Captioner ready on %s in %.1fs (pid %d)",
            self.engine.device,
            time.perf_counter() - t0,
            os.getpid(),
        )

    def generate(self, requests: list[dict[str, Any]]):
        """Plain engine call, shared with the online deployment."""
        self.calls += 1
        return self.engine.generate(requests)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        status = list(batch.get("status", [None] * n))
        error = list(batch.get("error", [None] * n))
        todo = [i for i in range(n) if status[i] != "error"]
        c = self.caption
        requests = [
            {
                "image": np.ascontiguousarray(batch["pixels"][i]),
                "question": c.get("question") or "Describe this image in detail.",
                "max_new_tokens": c.get("max_new_tokens", 128),
                "temperature": c.get("temperature", 0.0),
                "top_p": c.get("top_p"),
                "seed": c.get("seed", 0),
            }
            for i in todo
        ]
        results = self.generate(requests) if requests else []
        caption: list[str | None] = [None] * n
        tokens = np.zeros(n, dtype=np.int64)
        finish: list[str | None] = [None] * n
        seconds = np.zeros(n, dtype=np.float64)
        for i, res in zip(todo, results, strict=True):
            status[i], error[i] = res.status, res.error
            if res.ok:
                caption[i], tokens[i], finish[i] = res.text, res.num_tokens, res.finish_reason
                seconds[i] = res.timings.get("total_s", 0.0) / max(res.timings.get("batch_size", 1), 1)
        return {
            "key": batch["key"],
            "source": batch["source"],
            "caption": np.array(caption, dtype=object),
            "question": np.array([c.get("question")] * n, dtype=object),
            "model": np.array([self.model_name] * n, dtype=object),
            "num_tokens": tokens,
            "width": _sizes(batch.get("width"), status),
            "height": _sizes(batch.get("height"), status),
            "finish_reason": np.array(finish, dtype=object),
            "status": np.array(["ok" if s is None else s for s in status], dtype=object),
            "error": np.array(error, dtype=object),
            "seconds": seconds,
        }


def _sizes(values, status: list) -> np.ndarray:
    """Original image sizes from the CPU stage; None for rows that failed."""
    if values is None:
        return np.array([None] * len(status), dtype=object)
    return np.array(
        [int(v) if s in (None, "ok") else None for v, s in zip(values, status, strict=True)], dtype=object
    )
