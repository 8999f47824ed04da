"""A stand-in model deployment for the ingress's error paths: it answers like ``ModelServer`` (info,
generate, stream, stats) but does what the request text asks: fail, run out of memory, crash, stall,
stream slowly. Loading can be held back until ``load()`` is called, to see the API while a model loads."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from ray import serve

from janus.engine.status import INTERNAL, INVALID_REQUEST, OUT_OF_MEMORY
from pipeline.serve.backend import Answer


def _text(request: dict[str, Any]) -> str:
    if "prompt" in request:
        return request["prompt"]
    return " ".join(turn["content"] for turn in request.get("conversation") or [])


@serve.deployment
class FakeModel:
    def __init__(self, kind: str, held: bool = False):
        self.kind = kind
        self.loaded = asyncio.Event()  # made inside the replica's event loop
        if not held:
            self.loaded.set()
        self.cancelled = 0

    def load(self) -> None:
        self.loaded.set()

    async def info(self) -> dict[str, Any]:
        await self.loaded.wait()
        if self.kind == "synthesis":
            return {"model": "fake", "image_size": 8, "scores": True}
        return {
            "model": "fake",
            "max_images": 4,
            "image_processor": {"image_size": 16},
            "image_tag": "<image_placeholder>",
            "streaming": True,
        }

    def _result(self, text: str, ok: dict[str, Any]) -> Answer:
        for word, code in (("oom", OUT_OF_MEMORY), ("internal", INTERNAL), ("invalid", INVALID_REQUEST)):
            if word in text:
                return Answer(status="error", error=f"fake {word}", code=code)
        if "crash" in text:
            raise RuntimeError("the fake model crashed on this request")
        return Answer(**ok)

    async def generate(self, request: dict[str, Any]) -> Any:
        text = _text(request)
        if "slow" in text:
            await asyncio.sleep(30)
        if self.kind == "synthesis":
            return self._result(text, {"image": np.zeros((8, 8, 3), np.uint8), "score": 0.5})
        return self._result(text, {"text": "fine", "num_tokens": 1, "prompt_tokens": 3, "finish_reason": "stop"})

    async def stream(self, request: dict[str, Any]):
        text = _text(request)
        result = self._result(text, {"text": "a" * 40, "num_tokens": 40, "prompt_tokens": 3, "finish_reason": "length"})
        if not result.ok:
            yield {"result": result}
            return
        try:
            for _ in range(40):
                await asyncio.sleep(0.1)
                yield {"delta": "a"}
            yield {"result": result}
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    def stats(self) -> dict[str, Any]:
        return {"replica": serve.get_replica_context().replica_id.unique_id, "cancelled": self.cancelled}
