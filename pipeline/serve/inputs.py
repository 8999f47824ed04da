"""Untrusted request input -> what the engines take: bounded bodies, vetted image URLs, decoded pixels.

Everything here runs before a model sees the request, so every failure is the client's and becomes
a 4xx (``APIError``); nothing a client sends can make the ingress read an arbitrary file, fetch an
arbitrary URL or decode an unbounded image.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Request

from janus.models.image_processing_vlm import VLMImageProcessor
from pipeline.images import ImageDecodeError, model_pixels

from .errors import APIError, bad_request
from .schemas import ChatMessage

USER, ASSISTANT = "<|User|>", "<|Assistant|>"  # DeepSeek's roles (janus.models.conversation)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (header or stream)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")


# -- chat messages -> a DeepSeek conversation ---------------------------------------------------


@dataclass
class ChatInput:
    conversation: list[dict[str, str]]  # alternating <|User|> / <|Assistant|> turns, the user's last
    system_prompt: str | None  # None: the model's default
    image_urls: list[tuple[str, str]] = field(default_factory=list)  # (param path, URL), in order


def chat_input(messages: list[ChatMessage], image_tag: str) -> ChatInput:
    """OpenAI messages -> DeepSeek turns; each image part becomes ``image_tag`` where it stood.

    System/developer messages become the system prompt; consecutive messages of one role merge
    into one turn (the template only renders alternating turns).
    """
    system: list[str] = []
    turns: list[dict[str, str]] = []
    urls: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        pieces = []
        for j, part in enumerate(message.content or []):
            param = f"messages[{i}].content[{j}]"
            if part.image_url is not None:
                if message.role != "user":
                    raise bad_request(f"{param}: only user messages may carry images", param=param)
                pieces.append(image_tag)
                urls.append((f"{param}.image_url.url", part.image_url.url))
            else:
                if image_tag in (part.text or ""):
                    raise bad_request(f"{param}: text must not contain {image_tag}", param=param)
                pieces.append(part.text or "")
        text = "\n".join(pieces)
        if message.role in ("system", "developer"):
            system.append(text)
            continue
        role = USER if message.role == "user" else ASSISTANT
        if not turns and role == ASSISTANT:
            raise bad_request(f"messages[{i}]: the conversation must start with a user message")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + text
        else:
            turns.append({"role": role, "content": text})
    if not turns or turns[-1]["role"] != USER:
        raise bad_request("messages: the last message must be a user message", param="messages")
    if not urls:
        raise bad_request(
            "messages: Janus answers about images: include at least one image_url content part",
            code="missing_image",
            param="messages",
        )
    return ChatInput(turns, "\n".join(system) if system else None, urls)


# -- image URLs -> bytes -----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """Where images may come from: data: URLs always, file:// and s3:// under allowed prefixes only."""

    prefixes: tuple[str, ...] = ()
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_bytes: int = 16 * 2**20

    def read(self, url: str, param: str) -> bytes:
        """Blocking (files, S3): call it from a worker thread."""
        if url.startswith("data:"):
            return _data_url(url, param)
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in ("file", "s3"):
            raise bad_request(
                f"{param}: only data: URLs (base64) and allow-listed file:// or s3:// URLs are accepted; "
                "this server fetches nothing from the web",
                code="unsupported_image_url",
                param=param,
            )
        self._check_allowed(url, param)
        try:
            if scheme == "file":
                with open(url[len("file://") :], "rb") as f:
                    data = f.read(self.max_bytes + 1)
            else:
                import fsspec

                with fsspec.open(url, "rb", **self.storage_options) as f:
                    data = f.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise bad_request(
                f"{param}: image not found: {url}", code="image_not_found", param=param
            ) from None
        except (OSError, ValueError) as exc:
            raise bad_request(
                f"{param}: cannot read {url}: {type(exc).__name__}", code="image_unreadable", param=param
            ) from None
        if len(data) > self.max_bytes:
            raise bad_request(
                f"{param}: image is larger than {self.max_bytes} bytes", code="image_too_large", param=param
            )
        return data

    def _check_allowed(self, url: str, param: str) -> None:
        path = url.split("://", 1)[1]
        segments = path.split("/")
        allowed = (
            not any(c in url for c in "\\\x00")
            and not any(s in (".", "..") for s in segments)
            and any(url.startswith(p if p.endswith("/") else p + "/") for p in self.prefixes)
        )
        if allowed and url.startswith("file://"):  # symlinks must not lead out of the allowed tree
            real = os.path.realpath(path)
            allowed = any(
                real.startswith(os.path.realpath(p[len("file://") :]) + os.sep)
                for p in self.prefixes
                if p.startswith("file://")
            )
        if not allowed:
            raise bad_request(
                f"{param}: {url.split('://', 1)[0]}:// images are only read from the configured prefixes",
                code="image_url_not_allowed",
                param=param,
            )


def _data_url(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise bad_request(
            f"{param}: a data: URL must be base64 (data:image/png;base64,...)",
            code="invalid_image_url",
            param=param,
        )
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(
            f"{param}: invalid base64 image data: {exc}", code="invalid_base64", param=param
        ) from None


def decode_for_model(data: bytes, param: str, max_pixels: int, processor: dict[str, Any]) -> np.ndarray:
    """Bytes -> uint8 [S, S, 3], exactly as the caption job's CPU stage does (``model_pixels``);
    ``processor``: the model's preprocessor config, as its deployment reports it."""
    try:
        pixels, _ = model_pixels(data, VLMImageProcessor.from_dict(processor), max_pixels)
    except ImageDecodeError as exc:
        raise bad_request(f"{param}: {exc}", code="invalid_image", param=param) from None
    return pixels
