"""A model deployment: the batch jobs' own actor class (``Synthesizer`` or ``Captioner``) behind
``@serve.batch``, so online requests that arrive together share one ``actor.generate`` call."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from janus.engine import SynthesisEngine


@serve.deployment
class ModelServer:
    """One replica holds one model; one batch runs at a time (the engines are not thread-safe)."""

    def __init__(
        self,
        actor_cls: type,
        model: dict[str, Any],
        engine: dict[str, Any],
        params: dict[str, Any],
        batching: dict[str, Any],
        quality: dict[str, Any] | None = None,
    ):
        self.actor = actor_cls(model, engine, params, quality)  # exactly as Ray Data constructs it
        self.run_batch.set_max_batch_size(batching["max_batch_size"])
        self.run_batch.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])
        self.requests = 0
        self.largest_batch = 0

    async def generate(self, request: dict[str, Any]) -> Any:
        """One engine request -> its SynthesisResult / CaptionResult (batched with its neighbours)."""
        return await self.run_batch(request)

    @serve.batch
    async def run_batch(self, requests: list[dict[str, Any]]) -> list[Any]:
        self.requests += len(requests)
        self.largest_batch = max(self.largest_batch, len(requests))
        # in a thread: the replica keeps accepting requests (the next batch forms meanwhile)
        return await asyncio.to_thread(self.actor.generate, requests)

    def info(self) -> dict[str, Any]:
        """What the ingress needs to validate requests for this model; answers once it is loaded."""
        engine = self.actor.engine
        if isinstance(engine, SynthesisEngine):
            return {
                "model": self.actor.model_name,
                "image_size": engine.image_size,
                "scores": self.actor.quality.score,
            }
        return {
            "model": self.actor.model_name,
            "max_images": engine.max_images_per_request,
            "image_processor": engine.processor.image_processor.to_dict(),
            "image_tag": engine.image_tag,
        }

    def stats(self) -> dict[str, int]:
        """This replica's counters: requests served and model calls made (their ratio is the batching)."""
        return {
            "requests": self.requests,
            "model_calls": self.actor.calls,
            "largest_batch": self.largest_batch,
        }
