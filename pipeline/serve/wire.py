"""The OpenAI wire format: request bodies in, response bodies, server-sent events and usage out, in
the shapes the official ``openai`` client parses (chat completions and chunks; images, their usage
and the ``image_generation.*`` stream events)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import math
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import numpy as np
import PIL.Image
from pydantic import BaseModel, ValidationError

from .backend import Answer
from .errors import validation_error

Body = TypeVar("Body", bound=BaseModel)
DONE = "data: [DONE]\n\n"


def parse(model: type[Body], body: bytes) -> Body:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def event(data: dict[str, Any], name: str | None = None) -> str:
    """One server-sent event (``name``: its ``event:`` line)."""
    return (f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n"


def error_event(message: str, code: str | None) -> str:
    """A failure after the stream started (its status line is sent): the client raises it."""
    return event({"type": "error", "error": {"message": message, "type": "server_error", "code": code}})


# -- chat -------------------------------------------------------------------------------------


def text_pieces(text: str) -> list[str]:
    """Word-sized stream deltas that concatenate back to exactly ``text``."""
    return re.findall(r"\s*\S+|\s+$", text)


def chat_usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.num_tokens,
        "total_tokens": answer.prompt_tokens + answer.num_tokens,
    }


def chat_completion(completion_id: str, created: int, model: str, answer: Answer) -> dict[str, Any]:
    message = {"role": "assistant", "content": answer.text}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": answer.finish_reason, "logprobs": None}
        ],
        "usage": chat_usage(answer),
    }


class ChatChunks:
    """One streamed completion's ``chat.completion.chunk`` events."""

    def __init__(self, completion_id: str, created: int, model: str):
        self.head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }

    def delta(self, delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return event({**self.head, "choices": [choice]})

    def usage(self, answer: Answer) -> str:
        return event({**self.head, "choices": [], "usage": chat_usage(answer)})

    def end(self, answer: Answer, include_usage: bool) -> str:
        """The finish reason, [usage] and ``[DONE]``; or the error of an answer that failed mid-stream."""
        if not answer.ok:
            return error_event(answer.error or "the answer failed", answer.code)
        usage = self.usage(answer) if include_usage else ""
        return self.delta({}, answer.finish_reason) + usage + DONE


async def sse_whole(chunks: ChatChunks, answer: Answer, include_usage: bool) -> AsyncIterator[str]:
    """``batch`` mode: the answer is complete before the first event (the whole batch decodes at once),
    so this sends the finished text in word-sized deltas in OpenAI's chunk sequence."""
    yield chunks.delta({"role": "assistant", "content": ""})
    for piece in text_pieces(answer.text or ""):
        yield chunks.delta({"content": piece})
    yield chunks.end(answer, include_usage)


async def sse_tokens(
    chunks: ChatChunks,
    first: dict[str, Any],
    rest: Any,
    include_usage: bool,
    on_text: Callable[[], None],
    on_done: Callable[[Answer], None],
) -> AsyncIterator[str]:
    """``scheduler`` mode: each text delta as the model decodes it, then the end. A client that leaves
    cancels the stream, which frees the request's rows. ``on_text`` runs at each delta's send."""
    yield chunks.delta({"role": "assistant", "content": ""})
    async with contextlib.aclosing(replica_items(first, rest)) as items:
        async for item in items:
            if "result" in item:
                on_done(item["result"])
                yield chunks.end(item["result"], include_usage)
            else:
                on_text()
                yield chunks.delta({"content": item["delta"]})


async def replica_items(first: dict[str, Any], rest: Any) -> AsyncIterator[dict[str, Any]]:
    """A model replica's streamed items, ``first`` and the rest up to ``{"result": ...}``; closed
    before that (the client left), it cancels the rest, which frees the request's rows."""
    item = first
    try:
        yield item
        while "result" not in item:
            item = await rest.__anext__()
            yield item
    finally:
        if "result" not in item:
            rest.cancel()


# -- images -----------------------------------------------------------------------------------


def quality_fields(answer: Answer) -> dict[str, Any]:
    """Extension fields of one image: how it was decoded (forward passes, method), its
    self-verification score; with best_of, every candidate's."""
    out: dict[str, Any] = {}
    if answer.decode_passes is not None:
        out["decode_passes"] = answer.decode_passes
        out["decode_method"] = answer.decode_method
    if answer.score is not None:
        out["score"] = round(answer.score, 6)
    if answer.scores is not None and len(answer.scores) > 1:
        out["candidate"] = answer.candidate
        out["candidate_scores"] = [None if math.isnan(v) else round(v, 6) for v in answer.scores]
    return out


def image_usage(answers: list[Answer]) -> dict[str, Any]:
    """OpenAI's image usage: the prompt's text tokens in, the image codes made out (all candidates)."""
    text = sum(a.prompt_tokens for a in answers)
    made = sum(a.num_tokens for a in answers)
    return {
        "input_tokens": text,
        "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
        "output_tokens": made,
        "output_tokens_details": {"image_tokens": made, "text_tokens": 0},
        "total_tokens": text + made,
    }


def images_response(
    created: int, data: list[dict[str, Any]], answers: list[Answer], size: str
) -> dict[str, Any]:
    return {
        "created": created,
        "data": data,
        "background": "opaque",
        "output_format": "png",
        "size": size,
        "usage": image_usage(answers),
    }


class ImageEvents:
    """One streamed image's ``image_generation.partial_image`` and ``image_generation.completed``
    events, as the official client's ``ImageGenStreamEvent`` types read them."""

    def __init__(self, created: int, size: str):
        self.common = {"background": "opaque", "output_format": "png", "quality": "auto", "size": size}
        self.created = created

    def partial(self, index: int, png_bytes: bytes) -> str:
        kind = "image_generation.partial_image"
        body = {
            "type": kind,
            "b64_json": b64(png_bytes),
            "created_at": self.created,
            "partial_image_index": index,
        }
        return event({**body, **self.common}, kind)

    def completed(self, png_bytes: bytes, answer: Answer, seed: int) -> str:
        kind = "image_generation.completed"
        body = {
            "type": kind,
            "b64_json": b64(png_bytes),
            "created_at": self.created,
            "usage": image_usage([answer]),
        }
        return event({**body, **self.common, "seed": seed, **quality_fields(answer)}, kind)


async def sse_image(
    events: ImageEvents, first: dict[str, Any], rest: Any, seed: int, on_done: Callable[[Answer], None]
) -> AsyncIterator[str]:
    """A streamed image's partial pictures as the replica sends them, then the image. A client that
    leaves cancels the stream (``rest``), which frees the request's rows."""
    async with contextlib.aclosing(replica_items(first, rest)) as items:
        async for item in items:
            if "result" not in item:
                yield events.partial(item["index"], await asyncio.to_thread(png, item["partial"]))
                continue
            answer = item["result"]
            on_done(answer)
            if answer.ok:
                yield events.completed(await asyncio.to_thread(png, answer.image), answer, seed)
            else:
                yield error_event(answer.error or "the image failed", answer.code)
