"""The online application: an OpenAI-compatible FastAPI ingress in front of the model deployments.

    serve run configs/serve_tiny.yaml           # or: janus-pipeline serve --config configs/serve_tiny.yaml

Routes: ``POST /v1/chat/completions`` (captioning / visual chat), ``POST /v1/images/generations``
(synthesis), ``GET /v1/models``, ``GET /health``. Every ``/v1`` request passes the same door
(``access.Door``): its API key, its key's limits, its metrics and rate-limit headers; the route
then validates what the client sent and turns it into engine requests for the model deployments
(``ModelServer``, through ``backend.Backend``). Bodies and events are ``wire``'s.

No ``from __future__ import annotations`` here: FastAPI and Serve's class-based views read the route
signatures at runtime.
"""

import asyncio
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline.model_ref import CAPTIONER, SYNTHESIZER

from . import wire
from .access import Call, Door, KeyRing
from .backend import Answer, Backend, check_answer, readiness
from .config import APISection, Key, ModelSection, ServeArgs, load_keys, parse_args
from .errors import APIError, bad_request, install_handlers
from .image_store import ImageStore
from .inputs import ImageSource, chat_input, decode_for_model
from .limits import Gate, RateLimits
from .model_server import ModelServer
from .schemas import SEED_LIMIT, ChatCompletionRequest, ImageGenerationRequest

HEALTH_TIMEOUT_S = 2.0
CHAT, IMAGES, MODELS = "/v1/chat/completions", "/v1/images/generations", "/v1/models"

api = FastAPI(title="Janus-Pro", docs_url=None, redoc_url=None)
install_handlers(api)


def _engine_chat(
    req: ChatCompletionRequest, chat: Any, images: list[np.ndarray], max_tokens: int
) -> dict[str, Any]:
    return {
        "images": images,
        "conversation": chat.conversation,
        "system_prompt": chat.system_prompt,
        "max_new_tokens": max_tokens,
        "temperature": req.temperature or 0.0,
        "top_p": req.top_p,
        "seed": secrets.randbelow(SEED_LIMIT) if req.seed is None else req.seed,
        "ignore_eos": req.ignore_eos,
    }


def _engine_image(req: ImageGenerationRequest, seed: int) -> dict[str, Any]:
    fields = {
        "seed": seed,
        "cfg_weight": req.cfg_weight,
        "temperature": req.temperature,
        "best_of": req.best_of,
    }
    return {"prompt": req.prompt, **fields}


# Everything the routes use is defined above: serve.ingress snapshots (pickles) the FastAPI app
# when the class below is decorated, so later module names would be missing in the replicas.
@serve.deployment(name="JanusAPI")
@serve.ingress(api)
class JanusAPI:
    """Keys, limits, metrics, validation, image intake and response shapes; never holds a model."""

    def __init__(
        self,
        synthesis: DeploymentHandle | None,
        caption: DeploymentHandle | None,
        names: dict[str, str],
        settings: dict[str, Any],
        keys: list[Key] | None = None,
        limits: DeploymentHandle | None = None,
    ):
        s = self.settings = APISection.model_validate(settings)
        self.synthesis = Backend(synthesis, names["synthesis"], s) if synthesis is not None else None
        self.caption = Backend(caption, names["caption"], s) if caption is not None else None
        self.images = ImageSource(tuple(s.image_url_prefixes), s.image_storage_options, s.max_image_bytes)
        self.store = ImageStore(s.image_store) if s.image_store is not None else None
        gate = Gate(limits, s.limits_timeout_s, s.request_timeout_s + 60, s.retry_after_s)
        self.door = Door(KeyRing(keys or [], s.limits), gate, s.max_body_bytes)
        self.created = int(time.time())
        wire.png(np.zeros((8, 8, 3), np.uint8))  # the PNG encoder loads here, not in a first request

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

    async def _model_route(
        self, request: Request, path: str, backend: Backend | None, what: str, body: type, route
    ) -> Response:
        """A route of one model: counted under its served name; a request for another model is a 404
        before ``route(req, call, backend)`` runs."""
        call = Call(path, model=backend.name if backend else "")

        async def checked(req: Any, call: Call) -> Response:
            return await route(req, call, self._backend(backend, req.model, what))

        return await self.door.handle(request, call, body, checked)

    # -- chat ------------------------------------------------------------------------------------
    @api.post(CHAT)
    async def chat_completions(self, request: Request) -> Response:
        what = "chat completions"
        return await self._model_route(request, CHAT, self.caption, what, ChatCompletionRequest, self._chat)

    async def _chat(self, req: ChatCompletionRequest, call: Call, backend: Backend) -> Response:
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
        loads = (
            asyncio.to_thread(self._load_image, url, p, info["image_processor"]) for p, url in chat.image_urls
        )
        engine_request = _engine_chat(req, chat, list(await asyncio.gather(*loads)), max_tokens)
        chunks = wire.ChatChunks(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), backend.name)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        if req.stream and info.get("streaming"):
            first, rest = await backend.stream("stream", engine_request)
            if "result" in first:  # failed (or finished) before its first token: a plain HTTP answer
                check_answer(first["result"], self.settings.retry_after_s)
            on_text, on_done = (lambda: self.door.first_text(call)), (lambda a: self.door.chat_done(call, a))
            return self.door.streamed(
                call, wire.sse_tokens(chunks, first, rest, include_usage, on_text, on_done)
            )
        answer = await backend.generate(engine_request)
        check_answer(answer, self.settings.retry_after_s)
        self.door.chat_done(call, answer)
        if req.stream:
            return self.door.streamed(call, wire.sse_whole(chunks, answer, include_usage))
        head = chunks.head
        return JSONResponse(wire.chat_completion(head["id"], head["created"], backend.name, answer))

    def _load_image(self, url: str, param: str, processor: dict[str, Any]) -> np.ndarray:
        data = self.images.read(url, param)
        return decode_for_model(data, param, self.settings.max_pixels, processor)

    # -- images ----------------------------------------------------------------------------------
    @api.post(IMAGES)
    async def images_generations(self, request: Request) -> Response:
        what = "image generation"
        return await self._model_route(request, IMAGES, self.synthesis, what, ImageGenerationRequest, self._images)

    async def _images(self, req: ImageGenerationRequest, call: Call, backend: Backend) -> Response:
        self._check_image_request(req)
        info = await backend.ready_info()
        side = info["image_size"]
        if req.best_of > 1 and not info["scores"]:
            raise bad_request(
                "best_of needs the server's quality.score on (it picks the best candidate by score)",
                param="best_of",
            )
        size = f"{side}x{side}"
        if req.size not in (None, "auto", size):
            raise bad_request(
                f"size {req.size!r} is not supported: {backend.name} generates {size} images only",
                code="unsupported_size",
                param="size",
            )
        first = secrets.randbelow(SEED_LIMIT) if req.seed is None else req.seed
        seeds = [(first + i) % SEED_LIMIT for i in range(req.n)]  # as the batch job's n_samples
        if req.stream:
            return await self._image_stream(req, call, backend, seeds[0], size, bool(info.get("streaming")))
        answers = await asyncio.gather(*(self._image(call, backend, _engine_image(req, s)) for s in seeds))
        for answer in answers:
            check_answer(answer, self.settings.retry_after_s)
        pngs = await asyncio.to_thread(lambda: [wire.png(a.image) for a in answers])
        if req.response_format == "url":
            links = [{"url": u} for u in await asyncio.to_thread(lambda: [self.store.put(p) for p in pngs])]
        else:
            links = [{"b64_json": wire.b64(p)} for p in pngs]
        data = [
            {**link, "seed": s, **wire.quality_fields(a)}
            for link, s, a in zip(links, seeds, answers, strict=True)
        ]
        return JSONResponse(wire.images_response(int(time.time()), data, list(answers), size))

    def _check_image_request(self, req: ImageGenerationRequest) -> None:
        s = self.settings
        if req.n > s.max_n:
            raise bad_request(f"n is {req.n}; at most {s.max_n} images per request", param="n")
        if req.best_of > s.max_best_of:
            raise bad_request(
                f"best_of is {req.best_of}; at most {s.max_best_of} candidates per image", param="best_of"
            )
        if req.response_format == "url" and self.store is None:
            raise bad_request(
                "response_format 'url' needs an image store: set api.image_store.url in the server's "
                "config (e.g. s3://bucket/images/ or file:///srv/images/), or ask for b64_json",
                param="response_format",
            )
        if req.stream and (req.n > 1 or req.best_of > 1 or req.response_format == "url"):
            raise bad_request(
                "stream: true sends one image (n=1, best_of=1) as b64_json events", param="stream"
            )

    async def _image(self, call: Call, backend: Backend, request: dict[str, Any]) -> Answer:
        answer = await backend.generate(request)
        self.door.image_done(call, answer)
        return answer

    async def _image_stream(
        self, req: ImageGenerationRequest, call: Call, backend: Backend, seed: int, size: str, streaming: bool
    ) -> Response:
        """Partial pictures while the codes are drawn (a scheduler replica), then the image."""
        request = _engine_image(req, seed)
        if streaming:
            first, rest = await backend.stream("stream_image", request, req.partial_images or 0)
        else:  # batch mode: the whole image at once, then its one event
            first, rest = {"result": await backend.generate(request)}, None
        if "result" in first:
            check_answer(first["result"], self.settings.retry_after_s)

        events = wire.ImageEvents(int(time.time()), size)
        return self.door.streamed(
            call, wire.sse_image(events, first, rest, seed, lambda a: self.door.image_done(call, a))
        )

    # -- discovery and health --------------------------------------------------------------------
    @api.get(MODELS)
    async def models(self, request: Request) -> Response:
        return await self.door.handle(request, Call(MODELS), None, self._models)

    async def _models(self, _: None, call: Call) -> Response:
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
    """Application builder (the Serve YAML's ``import_path``); ``args`` as in ``config.ServeArgs``.
    API keys are read here (``api.keys``), where the application is built."""
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
    keys = load_keys(cfg.api)
    limited = cfg.api.limits.any or any(k.limits.any for k in keys)
    return JanusAPI.options(**cfg.api.deployment_options()).bind(
        handles["synthesis"],
        handles["caption"],
        names,
        cfg.api.model_dump(),
        keys,
        RateLimits.bind() if limited else None,
    )


def _model(section: ModelSection) -> dict[str, Any]:
    """The actors' ``model`` dict (the batch jobs' model section), with the served name."""
    return {**section.model_dump(exclude={"name"}), "name": section.served_name}
