"""The ingress's client of the model deployments: calls with time limits, Ray's overload and outage
answers turned into HTTP errors, and the answer type both sides share.

``Answer`` is plain data in a module without torch: the engines' result classes live beside torch, and
unpickling one in the ingress imported torch there (seconds, on the first answer after start).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from janus.engine.status import DEVICE_LOST, INTERNAL, OK, OUT_OF_MEMORY

from .config import APISection
from .errors import APIError, bad_request, overloaded


@dataclass
class Answer:
    """A model deployment's answer to one request (a chat answer or one image)."""

    status: str = OK
    error: str | None = None
    code: str | None = None  # the engine's failure reason (``janus.engine.status``)
    text: str | None = None
    finish_reason: str | None = None  # "stop" (end of answer) or "length"
    prompt_tokens: int = 0
    num_tokens: int = 0  # tokens made: the answer's, or an image's codes (all candidates')
    image: np.ndarray | None = None  # uint8 [H, W, 3]
    score: float | None = None  # self-verification score of the image
    scores: list[float] | None = None  # best-of-k: every candidate's score
    candidate: int | None = None  # best-of-k: which candidate won
    decode_passes: int | None = None  # forward passes the image took (speculative decoding takes fewer)
    decode_method: str | None = None  # "off", "jacobi" or "coupled"

    @property
    def ok(self) -> bool:
        return self.status == OK

    @classmethod
    def of(cls, result: Any, **extra: Any) -> Answer:
        """An engine result (``CaptionResult`` / ``SynthesisResult``) as plain data."""
        fields = {k: getattr(result, k) for k in cls.__dataclass_fields__ if hasattr(result, k)}
        if fields.get("scores") is not None:
            fields["scores"] = [float(v) for v in fields["scores"]]
        return cls(**{**fields, **extra})


def check_answer(answer: Answer, retry_after_s: int) -> None:
    """An engine row error is the request's fault, except running out of device memory."""
    if answer.ok:
        return
    if answer.code == OUT_OF_MEMORY:
        raise overloaded(f"the model could not fit this request right now: {answer.error}", retry_after_s)
    if answer.code == DEVICE_LOST:  # the replica is being replaced; another one can answer
        raise APIError(503, answer.error, code="model_unavailable", headers={"Retry-After": str(retry_after_s)})
    if answer.code == INTERNAL:
        raise APIError(500, f"internal error: {answer.error}", code="internal_error")
    raise bad_request(answer.error or "invalid request", code=answer.code or "invalid_request")


class Backend:
    """A model deployment as the ingress sees it: its handle, served name and (cached) limits."""

    def __init__(self, handle: DeploymentHandle, name: str, settings: APISection):
        self.handle = handle
        self.name = name
        self.retry_after_s = settings.retry_after_s
        self.timeout_s = settings.request_timeout_s
        self.load_wait_s = settings.load_wait_s
        self._info: dict[str, Any] | None = None

    async def info(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The model's limits; a replica answers only once its model is loaded."""
        if self._info is None:
            self._info = await self._remote("info", timeout_s=timeout_s)
        return self._info

    async def ready_info(self) -> dict[str, Any]:
        """``info`` for a request: a model still loading is a 503 the client can retry, not a hang."""
        try:
            return await self.info(timeout_s=self.load_wait_s)
        except TimeoutError:
            raise self._unavailable("model_loading", "is still loading") from None

    async def generate(self, request: dict[str, Any]) -> Answer:
        try:
            return await self._remote("generate", request, timeout_s=self.timeout_s)
        except TimeoutError:
            raise self._timeout("answer") from None

    async def stream(self, method: str, *args: Any) -> tuple[dict[str, Any], Any]:
        """Start a streamed answer: (its first item, the rest). Waiting for the first item turns a bad
        request or a full queue into an HTTP error before any byte of the stream is sent."""
        stream = getattr(self.handle.options(stream=True), method).remote(*args)
        with self._errors():
            try:
                return await asyncio.wait_for(stream.__anext__(), self.timeout_s), stream
            except TimeoutError:
                stream.cancel()
                raise self._timeout("start answering") from None
            except BaseException:
                stream.cancel()
                raise

    async def _remote(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        response = getattr(self.handle, method).remote(*args)
        with self._errors():
            try:
                return await asyncio.wait_for(_awaited(response), timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                response.cancel()  # the client went away or waited too long: free the model's slot
                raise

    def _unavailable(self, code: str, why: str) -> APIError:
        return APIError(
            503,
            f"model {self.name} {why}; retry later",
            code=code,
            headers={"Retry-After": str(self.retry_after_s)},
        )

    def _timeout(self, what: str) -> APIError:
        return APIError(504, f"model {self.name} did not {what} within {self.timeout_s:g} s", code="timeout")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Ray's answers for a model that is full or down -> 503 with Retry-After."""
        try:
            yield
        except BackPressureError:
            raise overloaded(
                f"model {self.name} is at capacity (its queue is full); retry later", self.retry_after_s
            ) from None
        except (DeploymentUnavailableError, RayActorError) as exc:
            raise self._unavailable(
                "model_unavailable", f"is unavailable right now ({type(exc).__name__})"
            ) from None


async def _awaited(response: Any) -> Any:
    return await response


async def readiness(backends: dict[str, Backend | None], timeout_s: float) -> dict[str, bool]:
    """Per configured model: has a replica answered (i.e. finished loading) within the timeout?"""
    ready: dict[str, bool] = {}
    for kind, backend in backends.items():
        if backend is not None:
            try:
                await backend.info(timeout_s=timeout_s)
                ready[kind] = True
            except (APIError, TimeoutError):
                ready[kind] = False
    return ready
