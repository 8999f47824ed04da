"""Synthesizer: one full Janus model per actor; Ray Data calls it on batches of prompt rows."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from janus.engine import SynthesisEngine
from janus.engine.quality import CuratedSynthesis, QualityOptions
from janus.models.siglip_vit import tower_width
from pipeline.columns import OutputColumns
from pipeline.images import phash

from .common import ModelActor, objects, per_row_seconds

CARRIED = OutputColumns("synthesis").carried()  # the reader's columns, passed through


class Synthesizer(ModelActor):
    """Callable class for ``map_batches`` (and the Serve deployment): prompt rows -> image rows.

    Input columns: the prompt reader's (key, prompt, seed, cfg_weight, temperature, ...; status/error
    set by the reader for rows that were already bad). Output: the columns ``pipeline.columns``
    declares for the model stage: the input columns, status, error, image (uint8 [H, W, 3]; zeros for
    failed rows), seconds, the model name, and what the model reads back from each image
    (``quality``): score, candidate/scores (best-of-k), rating_<name>, embedding, phash; and how the
    image was decoded (decode_method, decode_passes).
    Rows whose score is below ``quality.min_score`` get status ``filtered``.
    """

    engine_class = SynthesisEngine

    def __init__(
        self,
        model: dict[str, Any],
        engine: dict[str, Any] | None = None,
        sampling: dict | None = None,
        quality: dict | None = None,
    ):
        super().__init__(model, engine)
        self.sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
        quality = dict(quality or {})
        self.min_score = quality.pop("min_score", None)
        self.quality = QualityOptions(**quality)
        if self.quality.reads:
            self.runner = CuratedSynthesis(self.engine, self.quality)
        self.embedding_width = tower_width(self.engine.model.config.vision_config.params)

    def with_defaults(self, request: dict[str, Any]) -> dict[str, Any]:
        return {**self.sampling, **request}

    def expand(self, requests: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
        requests = [self.with_defaults(r) for r in requests]
        if isinstance(self.runner, CuratedSynthesis):
            return self.runner.expand(requests)
        return requests, None

    def complete(self, engine_requests: list[Any], plan: Any, results: list) -> list:
        if isinstance(self.runner, CuratedSynthesis):
            return self.runner.complete(engine_requests, plan, results)
        return results

    def complete_many(self, calls: list[tuple[list[Any], Any, list]]) -> list[list]:
        """Several requests' candidates read back (scored) in one model batch, as the batch job reads
        its rows, instead of one small batch per request: the owners' request indices are offset per
        call, and the picked results (one per request, in order) split back per call."""
        if not isinstance(self.runner, CuratedSynthesis):
            return [self.complete(*call) for call in calls]
        candidates: list[Any] = []
        owners: list[tuple[int, int]] = []
        results: list = []
        sizes = []
        for engine_requests, plan, call_results in calls:
            size = max(i for i, _ in plan) + 1
            offset = sum(sizes)
            owners += [(offset + i, j) for i, j in plan]
            candidates += engine_requests
            results += call_results
            sizes.append(size)
        picked = self.runner.complete(candidates, owners, results)
        bounds = np.cumsum([0, *sizes])
        return [picked[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def request(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        return {
            "prompt": batch["prompt"][i],
            "seed": int(batch["seed"][i]),
            "cfg_weight": float(batch["cfg_weight"][i]),
            "temperature": float(batch["temperature"][i]),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started, n = time.perf_counter(), len(batch["key"])
        todo, results, status, error = self.run_rows(batch)
        size, q = self.engine.image_size, self.quality
        out = {
            "image": np.zeros((n, size, size, 3), dtype=np.uint8),
            "seconds": np.zeros(n, dtype=np.float64),
            "phash": np.zeros(n, dtype=np.int64),
            "score": np.full(n, np.nan, dtype=np.float32),
            "candidate": np.full(n, -1, dtype=np.int32),
            "scores": np.full((n, q.best_of), np.nan, dtype=np.float32),
            "decode_method": np.full(n, None, dtype=object),
            "decode_passes": np.zeros(n, dtype=np.int32),
            **{f"rating_{name}": np.full(n, np.nan, dtype=np.float32) for name in q.ratings},
        }
        embeddings: dict[int, np.ndarray] = {}
        for i, res in zip(todo, results, strict=True):
            if not res.ok:
                continue
            out["image"][i] = res.image
            out["seconds"][i], out["phash"][i] = per_row_seconds(res), phash(res.image)
            out["decode_method"][i], out["decode_passes"][i] = res.decode_method, res.decode_passes or 0
            if res.score is not None:
                out["score"][i] = res.score
                if self.min_score is not None and res.score < self.min_score:
                    status[i], error[i] = "filtered", f"score {res.score:.4f} < min_score {self.min_score}"
            if res.candidate is not None:
                out["candidate"][i] = res.candidate
                out["scores"][i, : len(res.scores)] = res.scores
            for name, value in (res.ratings or {}).items():
                out[f"rating_{name}"][i] = value
            if res.embedding is not None:
                embeddings[i] = res.embedding
        if q.embeddings:
            out["embedding"] = np.zeros((n, self.embedding_width), dtype=np.float16)
            for i, vector in embeddings.items():
                out["embedding"][i] = vector
        self.metrics.batch(status, started)
        return {
            **{name: batch[name] for name in CARRIED if name in batch},  # the writer checks they all are
            **out,
            "status": objects(status),
            "error": objects(error),
            "model": objects([self.model_name] * n),
        }
