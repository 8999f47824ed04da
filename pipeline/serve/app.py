"""The online application: an OpenAI-compatible FastAPI ingress in front of the model deployments.

    serve run configs/serve_tiny.yaml           # or: janus-pipeline serve --config configs/serve_tiny.yaml

Routes: ``POST /v1/chat/completions`` (captioning / visual chat), ``POST /v1/images/generations``
(synthesis), ``GET /v1/models``, ``GET /health``. The ingress validates everything a client sends
and turns it into engine requests; the model deployments (``ModelServer``) run the batch jobs'
actor classes with dynamic batching. Metrics: Ray's Prometheus endpoint (Serve's request, latency,
queue and batch metrics, plus the token and image counters below).

No ``from __future__ import annotations`` here: FastAPI and Serve's class-based views read the route
signatures at runtime.
"""

import asyncio
import base64
import contextlib
import io
import json
import math
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

import numpy as np
import PIL.Image
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter

from janus.engine.status import DEVICE_LOST, INTERNAL, OUT_OF_MEMORY
from pipeline.model_ref import CAPTIONER, SYNTHESIZER

from .config import APISection, ModelSection, ServeArgs, parse_args
from .errors import APIError, bad_request, install_handlers, overloaded, validation_error
from .inputs import ImageSource, chat_input, decode_for_model, read_body
from .model_server import ModelServer
from .schemas import SEED_LIMIT, ChatCompletionRequest, ImageGenerationRequest

HEALTH_TIMEOUT_S = 2.0
Body = TypeVar("Body", bound=BaseModel)

api = FastAPI(title="Janus-Pro", docs_url=None, redoc_url=None)
install_handlers(api)


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

    async def generate(self, request: dict[str, Any]) -> Any:
        try:
            return await self._remote("generate", request, timeout_s=self.timeout_s)
        except TimeoutError:
            raise self._timeout("answer") from None

    async def stream(self, request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Start a streamed answer: (its first item, the rest). Waiting for the first item turns a bad
        request or a full queue into an HTTP error before any byte of the stream is sent."""
        stream = self.handle.options(stream=True).stream.remote(request)
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
    def _errors(self):
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


def check_result(result: Any, retry_after_s: int) -> None:
    """An engine row error is the request's fault, except running out of device memory."""
    if result.ok:
        return
    if result.code == OUT_OF_MEMORY:
        raise overloaded(f"the model could not fit this request right now: {result.error}", retry_after_s)
    if result.code == DEVICE_LOST:  # the replica is being replaced; another one can answer
        raise APIError(503, result.error, code="model_unavailable", headers={"Retry-After": str(retry_after_s)})
    if result.code == INTERNAL:
        raise APIError(500, f"internal error: {result.error}", code="internal_error")
    raise bad_request(result.error, code=result.code or "invalid_request")


def parse(model: type[Body], body: bytes) -> Body:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def png_b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def text_pieces(text: str) -> list[str]:
    """Word-sized stream deltas that concatenate back to exactly ``text``."""
    return re.findall(r"\s*\S+|\s+$", text)


def _chunk(head: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"


def _usage(result: Any) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.num_tokens,
        "total_tokens": result.prompt_tokens + result.num_tokens,
    }


async def sse_chunks(
    completion_id: str, created: int, model: str, result: Any, usage: dict[str, int] | None
) -> AsyncIterator[str]:
    """``batch`` mode: the answer is complete before the first event (the whole batch decodes at once),
    so this sends the finished text in word-sized deltas in OpenAI's chunk sequence."""
    head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    yield _chunk(head, {"role": "assistant", "content": ""})
    for piece in text_pieces(result.text):
        yield _chunk(head, {"content": piece})
    yield _chunk(head, {}, result.finish_reason)
    if usage is not None:
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


async def sse_tokens(
    completion_id: str,
    created: int,
    model: str,
    first: dict[str, Any],
    rest: Any,
    include_usage: bool,
    on_done,
) -> AsyncIterator[str]:
    """``scheduler`` mode: each text delta as the model decodes it, then the finish reason, [usage] and
    ``[DONE]``. A client that leaves cancels the stream, which frees the request's slot."""
    head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    yield _chunk(head, {"role": "assistant", "content": ""})
    item = first
    try:
        while "result" not in item:
            yield _chunk(head, {"content": item["delta"]})
            item = await rest.__anext__()
    finally:
        if "result" not in item:
            rest.cancel()
    result = item["result"]
    on_done(result)
    if not result.ok:  # failed mid-stream (the answer had started): say so in the stream
        error = {"message": result.error, "type": "server_error", "code": result.code}
        yield f"data: {json.dumps({'error': error})}\n\n"
        return
    yield _chunk(head, {}, result.finish_reason)
    if include_usage:
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(result)})}\n\n"
    yield "data: [DONE]\n\n"


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


def _quality(result: Any) -> dict[str, Any]:
    """Extension fields of one image: its self-verification score; with best_of, every candidate's."""
    out: dict[str, Any] = {}
    if result.score is not None:
        out["score"] = round(result.score, 6)
    if result.scores is not None and len(result.scores) > 1:
        out["candidate"] = result.candidate
        out["candidate_scores"] = [None if math.isnan(v) else round(v, 6) for v in result.scores]
    return out


# Everything the routes use is defined above: serve.ingress snapshots (pickles) the FastAPI app
# when the class below is decorated, so later module names would be missing in the replicas.
@serve.deployment(name="JanusAPI")
@serve.ingress(api)
class JanusAPI:
    """Validation, image intake and response shapes; never holds a model."""

    def __init__(
        self,
        synthesis: DeploymentHandle | None,
        caption: DeploymentHandle | None,
        names: dict[str, str],
        settings: dict[str, Any],
    ):
        self.settings = APISection.model_validate(settings)
        self.synthesis = (
            Backend(synthesis, names["synthesis"], self.settings) if synthesis is not None else None
        )
        self.caption = Backend(caption, names["caption"], self.settings) if caption is not None else None
        self.images = ImageSource(
            tuple(self.settings.image_url_prefixes),
            self.settings.image_storage_options,
            self.settings.max_image_bytes,
        )
        self.created = int(time.time())
        self.tokens = Counter(
            "janus_chat_tokens", "Chat tokens read and written.", tag_keys=("model", "kind")
        )
        self.images_made = Counter("janus_images_generated", "Images generated.", tag_keys=("model",))

    def _backend(self, backend: Backend | None, model: str | None, what: str) -> Backend:
        if backend is None or (model is not None and model != backend.name):
            served = f"; this server's model for {what} is {backend.name!r}" if backend else ""
            raise APIError(
                404,
                f"model {model!r} does not exist or does not serve {what}{served}",
                code="model_not_found",
                param="model",
            )
        return backend

    # -- chat ------------------------------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        req = parse(ChatCompletionRequest, await read_body(request, self.settings.max_body_bytes))
        backend = self._backend(self.caption, req.model, "chat completions")
        info = await backend.ready_info()
        chat = chat_input(req.messages, info["image_tag"])
        if len(chat.image_urls) > info["max_images"]:
            raise bad_request(
                f"messages: {len(chat.image_urls)} images; at most {info['max_images']} per request",
                code="too_many_images",
                param="messages",
            )
        max_tokens = req.max_completion_tokens or req.max_tokens or self.settings.default_max_tokens
        if max_tokens > self.settings.max_tokens:
            raise bad_request(
                f"max_tokens is {max_tokens}; at most {self.settings.max_tokens}", param="max_tokens"
            )
        images = await asyncio.gather(
            *(
                asyncio.to_thread(self._load_image, url, param, info["image_processor"])
                for param, url in chat.image_urls
            )
        )
        engine_request = {
            "images": list(images),
            "conversation": chat.conversation,
            "system_prompt": chat.system_prompt,
            "max_new_tokens": max_tokens,
            "temperature": req.temperature or 0.0,
            "top_p": req.top_p,
            "seed": secrets.randbelow(SEED_LIMIT) if req.seed is None else req.seed,
            "ignore_eos": req.ignore_eos,
        }
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        if req.stream and info.get("streaming"):
            first, rest = await backend.stream(engine_request)
            if "result" in first:  # failed (or finished) before its first token: a plain HTTP answer
                check_result(first["result"], self.settings.retry_after_s)
            events = sse_tokens(
                completion_id,
                created,
                backend.name,
                first,
                rest,
                include_usage,
                lambda r: self._count(backend, r),
            )
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        result = await backend.generate(engine_request)
        check_result(result, self.settings.retry_after_s)
        self._count(backend, result)
        usage = _usage(result)
        if req.stream:
            events = sse_chunks(
                completion_id, created, backend.name, result, usage if include_usage else None
            )
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": backend.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": result.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": usage,
            }
        )

    def _count(self, backend: Backend, result: Any) -> None:
        if result.ok:
            self.tokens.inc(result.prompt_tokens, tags={"model": backend.name, "kind": "prompt"})
            self.tokens.inc(result.num_tokens, tags={"model": backend.name, "kind": "completion"})

    def _load_image(self, url: str, param: str, processor: dict[str, Any]) -> np.ndarray:
        data = self.images.read(url, param)
        return decode_for_model(data, param, self.settings.max_pixels, processor)

    # -- images ----------------------------------------------------------------------------------
    @api.post("/v1/images/generations")
    async def images_generations(self, request: Request) -> JSONResponse:
        req = parse(ImageGenerationRequest, await read_body(request, self.settings.max_body_bytes))
        backend = self._backend(self.synthesis, req.model, "image generation")
        if req.n > self.settings.max_n:
            raise bad_request(f"n is {req.n}; at most {self.settings.max_n} images per request", param="n")
        if req.best_of > self.settings.max_best_of:
            raise bad_request(
                f"best_of is {req.best_of}; at most {self.settings.max_best_of} candidates per image",
                param="best_of",
            )
        if req.response_format == "url":
            raise bad_request(
                "response_format 'url' is not supported: images are returned inline as b64_json",
                param="response_format",
            )
        info = await backend.ready_info()
        side = info["image_size"]
        if req.best_of > 1 and not info["scores"]:
            raise bad_request(
                "best_of needs the server's quality.score on (it picks the best candidate by score)",
                param="best_of",
            )
        if req.size not in (None, "auto", f"{side}x{side}"):
            raise bad_request(
                f"size {req.size!r} is not supported: {backend.name} generates {side}x{side} images only",
                code="unsupported_size",
                param="size",
            )
        first = secrets.randbelow(SEED_LIMIT) if req.seed is None else req.seed
        seeds = [(first + i) % SEED_LIMIT for i in range(req.n)]  # as the batch job's n_samples
        results = await asyncio.gather(
            *(
                backend.generate(
                    {
                        "prompt": req.prompt,
                        "seed": s,
                        "cfg_weight": req.cfg_weight,
                        "temperature": req.temperature,
                        "best_of": req.best_of,
                    }
                )
                for s in seeds
            )
        )
        for result in results:
            check_result(result, self.settings.retry_after_s)
        encoded = await asyncio.to_thread(lambda: [png_b64(r.image) for r in results])
        self.images_made.inc(len(results), tags={"model": backend.name})
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": [
                    {"b64_json": b64, "seed": s, **_quality(r)}
                    for b64, s, r in zip(encoded, seeds, results, strict=True)
                ],
            }
        )

    # -- discovery and health --------------------------------------------------------------------
    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        names = dict.fromkeys(b.name for b in (self.synthesis, self.caption) if b is not None)
        data = [
            {"id": n, "object": "model", "created": self.created, "owned_by": "janus-pipeline"} for n in names
        ]
        return JSONResponse({"object": "list", "data": data})

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 once every model has answered (it is loaded); 503 while any is still loading or down."""
        ready = await readiness({"synthesis": self.synthesis, "caption": self.caption}, HEALTH_TIMEOUT_S)
        ok = all(ready.values())
        return JSONResponse(
            {"status": "ready" if ok else "loading", "models": ready}, status_code=200 if ok else 503
        )


def build_app(args: Mapping[str, Any] | ServeArgs) -> serve.Application:
    """Application builder (the Serve YAML's ``import_path``); ``args`` as in ``config.ServeArgs``."""
    cfg = args if isinstance(args, ServeArgs) else parse_args(args)
    handles: dict[str, Any] = {"synthesis": None, "caption": None}
    names: dict[str, str] = {}
    if cfg.synthesis is not None:
        s = cfg.synthesis
        handles["synthesis"] = ModelServer.options(
            name="Synthesizer", **s.deployment_options("synthesis")
        ).bind(
            SYNTHESIZER,
            _model(s.model),
            s.engine,
            s.sampling.model_dump(),
            s.batching.model_dump(),
            s.quality.options(),
        )
        names["synthesis"] = s.model.served_name
    if cfg.caption is not None:
        c = cfg.caption
        handles["caption"] = ModelServer.options(name="Captioner", **c.deployment_options("caption")).bind(
            CAPTIONER, _model(c.model), c.engine, {}, c.batching.model_dump()
        )
        names["caption"] = c.model.served_name
    return JanusAPI.options(**cfg.api.deployment_options()).bind(
        handles["synthesis"], handles["caption"], names, cfg.api.model_dump()
    )


def _model(section: ModelSection) -> dict[str, Any]:
    """The actors' ``model`` dict (the batch jobs' model section), with the served name."""
    return {**section.model_dump(exclude={"name"}), "name": section.served_name}
