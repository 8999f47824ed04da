"""The door every ``/v1`` request passes: its API key (401; compared as a SHA-256 digest with every
configured key's, in constant time), its key's limits (429, rate-limit headers on every answer), and
its accounting (metrics labelled by route, model and key name; the
key's tokens and running requests handed back to the limits when the answer ends, streams included)."""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from . import wire
from .backend import Answer
from .config import Key, LimitsSection, digest
from .errors import APIError
from .inputs import read_body
from .limits import Admission, Background, Gate, RateLimited
from .metrics import IngressMetrics

logger = logging.getLogger(__name__)
EVENT_STREAM = {"media_type": "text/event-stream", "headers": {"Cache-Control": "no-cache"}}


@dataclass
class Call:
    """One request's accounting: who asked, for which model, what it used, when it began."""

    route: str
    model: str = ""  # the served name (metrics never carry what a client typed)
    key: Key | None = None
    admission: Admission = field(default_factory=Admission)
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_text: bool = False

    @property
    def tags(self) -> dict[str, str]:
        return {"model": self.model, "key": self.key.name if self.key else ""}


ANONYMOUS = "anonymous"  # no keys configured: everyone, under api.limits


class KeyRing:
    """Who is asking: the key a request's ``Authorization: Bearer <key>`` header presents."""

    def __init__(self, keys: list[Key], default_limits: LimitsSection):
        self.keys = keys
        self.anonymous = Key(ANONYMOUS, b"", default_limits)

    @property
    def open(self) -> bool:
        return not self.keys

    def identify(self, authorization: str | None) -> Key:
        """The presented key, or a 401 (OpenAI's ``invalid_api_key``); open: everyone is anonymous."""
        if self.open:
            return self.anonymous
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("no API key: send it as 'Authorization: Bearer <key>'")
        presented = digest(token)
        found = None
        for key in self.keys:  # every digest compared, in constant time: no early exit
            if hmac.compare_digest(presented, key.digest):
                found = key
        if found is None:
            raise unauthorized("incorrect API key provided")
        return found


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


Route = Callable[[Any, Call], Awaitable[Response]]


class EndingStream(StreamingResponse):
    """A streamed response that calls ``on_end`` once it ends, however: sent whole, failed, or
    cancelled because the client left. (Starlette stops iterating the body on a disconnect without
    closing it: a generator left waiting at a ``yield`` runs its ``finally`` only when the garbage
    collector reaches it, which on an idle replica can take minutes.)"""

    def __init__(self, content: AsyncIterator[str], on_end: Callable[[], Any], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_end = on_end

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_end()


class Door:
    def __init__(self, keys: KeyRing, gate: Gate, max_body_bytes: int):
        self.keys = keys
        self.gate = gate
        self.max_body_bytes = max_body_bytes
        self.metrics = IngressMetrics()
        self._ending = Background()  # calls still ending after their response
        if keys.open:
            logger.warning("no API keys configured (api.keys): anyone who reaches this port can use the API")

    async def handle(
        self, request: Request, call: Call, body: type[BaseModel] | None, route: Route
    ) -> Response:
        """Key -> body -> the key's limits -> the route. Every answer gets the key's rate-limit
        headers and is counted; a body that does not parse still counts as a request."""
        try:
            call.key = self.keys.identify(request.headers.get("authorization"))
            req, error = None, None
            if body is not None:
                try:
                    req = wire.parse(body, await read_body(request, self.max_body_bytes))
                except APIError as exc:
                    error = exc
            images = getattr(req, "n", 0) * getattr(req, "best_of", 1)
            call.admission = await self.gate.admit(call.key.name, call.key.limits, images)
            if error is not None:
                raise error
            response = await route(req, call)
        except APIError as exc:
            response = self._refused(call, exc)
        except Exception:
            logger.exception("unexpected error on %s", call.route)
            response = APIError(500, "internal error", code="internal_error").response()
        except asyncio.CancelledError:  # the client left before its answer: the call still ends
            self._end(call)
            raise
        response.headers.update(call.admission.headers)
        if not isinstance(response, StreamingResponse):
            await asyncio.shield(self._end(call))
        self.metrics.answered(call.route, call.model, call.tags["key"], response.status_code)
        return response

    def _refused(self, call: Call, exc: APIError) -> Response:
        if exc.status == 401:
            self.metrics.unauthorized.inc(tags={"route": call.route})
        elif isinstance(exc, RateLimited):
            self.metrics.rate_limited.inc(tags={"route": call.route, **call.tags, "limit": exc.limit})
        return exc.response()

    def _end(self, call: Call, events: AsyncGenerator[str, None] | None = None) -> asyncio.Task:
        """End ``call``: close its event stream (the model's stream is cancelled now, not when the
        garbage collector finds it), then hand its lease and tokens back to the limits. In a task of
        its own, in a fresh context: when a client leaves, Serve cancels its request and every call
        made in that request's context, and that is just when the lease must still end."""

        async def end() -> None:
            try:
                if events is not None:
                    await events.aclose()
            finally:
                if call.key is not None:
                    await self.gate.release(call.key.name, call.admission, call.tokens)

        return self._ending.start(end(), context=contextvars.Context())

    def streamed(self, call: Call, events: AsyncGenerator[str, None]) -> StreamingResponse:
        """A server-sent event stream whose end (or the client's leaving) ends the call."""
        return EndingStream(events, lambda: self._end(call, events), **EVENT_STREAM)

    # -- what the routes report ------------------------------------------------------------------
    def first_text(self, call: Call) -> None:
        """A streamed chat's first text is on its way: its time to first token."""
        if not call.first_text:
            call.first_text = True
            self.metrics.chat_ttft.observe(time.perf_counter() - call.started, tags=call.tags)

    def chat_done(self, call: Call, answer: Answer) -> None:
        if answer.ok:
            call.tokens = answer.prompt_tokens + answer.num_tokens
            self.metrics.chat_tokens.inc(answer.prompt_tokens, tags={**call.tags, "kind": "prompt"})
            self.metrics.chat_tokens.inc(answer.num_tokens, tags={**call.tags, "kind": "completion"})
            self.metrics.chat_e2e.observe(time.perf_counter() - call.started, tags=call.tags)

    def image_done(self, call: Call, answer: Answer) -> None:
        """One image is ready (each of a request's images: its own latency)."""
        if answer.ok:
            self.metrics.image_seconds.observe(time.perf_counter() - call.started, tags=call.tags)
            self.metrics.images.inc(1, tags=call.tags)
