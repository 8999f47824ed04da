"""Captioner: one full Janus model per actor; turns preprocessed image rows into caption rows."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from janus.engine import CaptionEngine
from janus.engine.quality import Reader
from janus.models.siglip_vit import tower_width
from pipeline.columns import OutputColumns

from .common import ModelActor, objects, per_row_seconds

CARRIED = OutputColumns("caption").carried()  # passed through from the reader and the CPU stage


class ScheduledBatches:
    """A batch of caption requests through the continuous-batching scheduler (``engine.max_batch_size``
    rows): a finished answer's row takes the next image at once. ``generate`` is the engine's."""

    def __init__(self, engine: CaptionEngine):
        from janus.engine.scheduler import Scheduler

        self.scheduler = Scheduler(engine, slots=engine.max_batch_size, keep_cache=False)

    def generate(self, requests: list[dict[str, Any]]) -> list[Any]:
        t0 = time.perf_counter()
        tickets = [self.scheduler.submit(r) for r in requests]
        self.scheduler.run_until_idle()
        results = [t.result for t in tickets]
        wall = time.perf_counter() - t0
        for res in results:  # each row's share of the batch's time, as the static engine reports it
            res.timings = {**res.timings, "total_s": wall, "batch_size": len(requests)}
        return results


class Captioner(ModelActor):
    """Callable class for ``map_batches`` (and the Serve deployment).

    Input columns: the image reader's and the CPU stage's (key, source, width, height, phash, ...),
    pixels (uint8 [S, S, 3], already resized and padded by that stage), status/error. Output: the
    columns ``pipeline.columns`` declares for the model stage: those input columns but pixels, caption
    (stripped of leading and trailing whitespace), question, model, num_tokens, finish_reason, status,
    error, seconds, and with ``quality.embeddings`` the image's embedding from the understanding tower.
    """

    engine_class = CaptionEngine

    def __init__(
        self,
        model: dict[str, Any],
        engine: dict[str, Any] | None = None,
        caption: dict | None = None,
        quality: dict | None = None,
    ):
        super().__init__(model, engine)
        self.caption = {k: v for k, v in (caption or {}).items() if v is not None}
        if self.caption.pop("continuous_batching", False):
            self.runner = ScheduledBatches(self.engine)
        self.reader = Reader(self.engine) if (quality or {}).get("embeddings") else None
        self.embedding_width = tower_width(self.engine.model.config.vision_config.params)

    def request(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        return {**self.caption, "image": np.ascontiguousarray(batch["pixels"][i])}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started, n = time.perf_counter(), len(batch["key"])
        todo, results, status, error = self.run_rows(batch)
        caption: list[str | None] = [None] * n
        finish: list[str | None] = [None] * n
        tokens = np.zeros(n, dtype=np.int64)
        seconds = np.zeros(n, dtype=np.float64)
        for i, res in zip(todo, results, strict=True):
            if res.ok:  # stored as the model wrote it, less the tokenizer's leading space
                caption[i], tokens[i], finish[i] = res.text.strip(), res.num_tokens, res.finish_reason
                seconds[i] = per_row_seconds(res)
        out = {
            **{name: batch[name] for name in CARRIED if name in batch},  # reader's, CPU stage's: all, in a job
            "caption": objects(caption),
            "question": objects([self.caption.get("question")] * n),
            "model": objects([self.model_name] * n),
            "num_tokens": tokens,
            "finish_reason": objects(finish),
            "status": objects(status),
            "error": objects(error),
            "seconds": seconds,
        }
        if self.reader is not None:
            ok = [i for i in range(n) if status[i] == "ok"]
            out["embedding"] = np.zeros((n, self.embedding_width), dtype=np.float16)
            if ok:
                out["embedding"][ok] = self.reader.embeddings(self.reader.features([batch["pixels"][i] for i in ok]))
        self.metrics.batch(status, started)
        return out
